"""Supervised fine-tuning (SFT) of the policy: LoRA on the processed FinQA data with TRL's SFTTrainer.

    python 03_sft_train.py                                     # default model, 3 epochs on train.jsonl
    python 03_sft_train.py --quick_test                        # 24 examples, 12 steps: a smoke run
    python 03_sft_train.py --run_id run_002 --epochs 1 --training.learning_rate 1e-4 --save_merged
    python 03_sft_train.py --resume                            # continue an interrupted run
    accelerate launch 03_sft_train.py --config qwen2.5-0.5b    # one or several GPUs

The data is TRL's conversational prompt-completion format, so the loss is on the completion only
(TRL masks the prompt; the labels are the assistant's JSON answer and its <|im_end|>). Every
validation.eval_steps steps and at the end: the loss on validation.num_samples val examples and
greedy generations on the same examples, scored with utils.rewards (format_rate, exec_acc,
reward_mean and its components). best = the highest val exec_acc, ties broken by reward_mean.

Writes outputs/<run_id>/03_sft/: ckpt_sft/{step_N, best, final} (LoRA adapter + tokenizer +
config.yaml; ckpt_sft/merged with --save_merged), logs/training_log.json, valid_samples/step_N.json,
trainer/checkpoint-N (optimizer, scheduler and RNG, for --resume) and manifest.json.
"""
import argparse
from pathlib import Path

from utils import cli, runs, training
from utils import config as config_lib
from utils.data import REWARD_FIELDS, read_processed

MODULE = "03_sft"
# --quick_test: tiny settings that explicit flags still override. 12 steps of 4 is about what the default
# model needs to write the JSON format (measured: 94% valid at step 10), so the stages after a quick SFT
# see real answers, not a constant -0.2 reward; 48 new tokens fit the sample's p95 answer (54 tokens).
QUICK_TEST = {"training.max_steps": 12, "training.save_steps": 6, "training.logging_steps": 1,
              "validation.eval_steps": 6, "validation.num_samples": 4, "validation.max_new_tokens": 48}
QUICK_TRAIN_EXAMPLES = 24


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    parser.add_argument("--train_jsonl", help="training data (default: <paths.data_dir>/train.jsonl)")
    parser.add_argument("--val_jsonl", help="validation data (default: <paths.data_dir>/val.jsonl)")
    parser.add_argument("--reward_spec", help="reward_spec.yaml for validation (default: "
                        "outputs/<run_id>/02_rewards/reward_spec.yaml if present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {QUICK_TRAIN_EXAMPLES} train and {QUICK_TEST['validation.num_samples']} val "
                             f"examples, {QUICK_TEST['training.max_steps']} steps, validation every "
                             f"{QUICK_TEST['validation.eval_steps']} steps, "
                             f"{QUICK_TEST['validation.max_new_tokens']} new tokens")
    parser.add_argument("--skip_validation", action="store_true",
                        help="no generation-based validation (the val loss still runs; best = lowest val loss)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run: from the newest complete checkpoint in the output "
                             "folder, or the one given (optimizer, scheduler, RNG, training log and best so far); "
                             "'--resume auto': the newest if there is one, else start afresh")
    parser.add_argument("--save_merged", action="store_true",
                        help="also save ckpt_sft/merged: the final LoRA folded into the base model")
    parser.add_argument("--max_train_examples", type=int, help="use only the first N training examples")
    parser.add_argument("--max_val_examples", type=int, help="use only the first N validation examples")
    return parser.parse_known_args(argv)


def load_split(path: Path, limit: int | None, required: tuple) -> list[dict]:
    """The first `limit` rows of a processed split, each with the `required` fields (utils.data.read_processed)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python 01_prepare_dataset.py first (or pass "
                                f"--train_jsonl/--val_jsonl FILE, or --paths.data_dir FOLDER)")
    rows = read_processed(path, required)
    return rows[:limit] if limit else rows


def to_dataset(rows: list[dict]):
    """Only the columns the trainer reads: exe_ans mixes numbers and "yes"/"no", and tables are
    nested lists, which Arrow would have to reconcile for nothing."""
    from datasets import Dataset

    return Dataset.from_list([{"id": r["id"], "prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens, QUICK_TEST)
    state = training.process_state()  # first: every process then loads its model onto its own device
    say = print if state.is_main_process else (lambda *_, **__: None)  # one process reports, one writes
    say(config_lib.dump(cfg))
    folder = runs.module_dir(args.run_id, MODULE, cfg["paths"]["output_dir"], cfg["paths"]["output_root"])
    ckpt_dir, trainer_dir = folder / "ckpt_sft", folder / "trainer"
    log_path = folder / "logs" / "training_log.json"
    resume_from = training.prepare_folder(folder, ("ckpt_sft", "logs", "valid_samples"), args.resume)
    runs.seed_everything(cfg["training"]["seed"])
    data_dir = Path(cfg["paths"]["data_dir"])
    train_path = Path(args.train_jsonl or data_dir / "train.jsonl")
    val_path = Path(args.val_jsonl or data_dir / "val.jsonl")

    with runs.Manifest(folder, MODULE, args, cfg, main_process=state.is_main_process) as manifest:
        # --- data ---
        train_limit = args.max_train_examples or (QUICK_TRAIN_EXAMPLES if args.quick_test else None)
        train_rows = load_split(train_path, train_limit, ("id", "prompt", "completion"))
        # val: the eval loss needs the completion, the generation-based validation the reward fields
        val_rows = load_split(val_path, args.max_val_examples, ("id", "prompt", "completion", *REWARD_FIELDS))
        val_rows = val_rows[:cfg["validation"]["num_samples"]]
        manifest.add_input("train", train_path)
        manifest.add_input("val", val_path)
        spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
        if spec_path:
            manifest.add_input("reward_spec", spec_path)
        say(f"{len(train_rows)} training examples ({train_path}), {len(val_rows)} validation examples ({val_path}); "
              f"reward spec: {spec_path or 'built-in defaults'}")

        # --- model ---
        from trl import SFTConfig, SFTTrainer

        from utils.modeling import load_model, load_tokenizer, resolve_model_path

        base_model = resolve_model_path(cfg)
        if Path(base_model).is_dir():
            manifest.add_input("base_model", base_model)
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, dtype=training.sft_base_dtype(cfg))
        precision = training.mixed_precision(cfg)
        say(f"precision: {precision['note']}")

        # --- train ---
        sft_config = SFTConfig(**training.training_arguments(cfg, trainer_dir, cfg["validation"]["eval_steps"]),
                               max_length=cfg["model"]["max_length"], completion_only_loss=True,
                               packing=False)
        validation = None if args.skip_validation else training.ValidationCallback(
            val_rows, tokenizer, folder / "valid_samples", spec=spec,
            max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"])
        checkpoints = training.CheckpointCallback(ckpt_dir, tokenizer, cfg, validation=validation,
                                                  resume=resume_from is not None,
                                                  save_total_limit=cfg["training"]["save_total_limit"])
        log = training.JsonLogCallback(log_path, cfg["training"]["report_to"])
        callbacks = [training.NonFiniteGuard(ckpt_dir, trainer_dir), *([validation] if validation else []),
                     checkpoints, log]
        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=to_dataset(train_rows),
                             eval_dataset=to_dataset(val_rows), processing_class=tokenizer,
                             peft_config=training.lora_config(cfg) if cfg["lora"]["enabled"] else None,
                             callbacks=callbacks)
        if resume_from:
            training.restore_token_count(trainer, resume_from)
        output = trainer.train(resume_from_checkpoint=resume_from)

        # --- save ---
        if not state.is_main_process:  # the main process holds the validation, best and log
            return {}
        final = checkpoints.save_final(trainer.model, trainer.state.global_step)
        log.write(trainer.state)
        for name, path in (("final", final), ("best", ckpt_dir / "best"), ("training_log", log_path),
                           ("valid_samples", folder / "valid_samples"), ("trainer", trainer_dir)):
            manifest.add_output(name, path)
        if args.save_merged:
            manifest.add_output("merged", training.save_merged(final, ckpt_dir / "merged", cfg))
        losses = [e["loss"] for e in trainer.state.log_history if e.get("loss") is not None]
        best = checkpoints.best or {}
        manifest.metrics.update({
            "train_loss_final": losses[-1] if losses else None,
            "train_loss_mean": output.training_loss,
            "global_step": trainer.state.global_step,
            "best_step": best.get("step"),
            **{f"best_val_{k}": best.get("metrics", {}).get(k) for k in ("exec_acc", "format_rate", "reward_mean", "eval_loss")},
            "train_runtime_s": output.metrics.get("train_runtime"),
            "train_tokens": log.tokens,
            "train_tokens_per_s": log.tokens_per_s,
            "peak_rss_gb": log.peak_rss_gb, "peak_gpu_gb": log.peak_gpu_gb,
            "dtype": precision["dtype"], "mixed_precision": "bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
            "precision_note": precision["note"],
            "base_model": base_model,
            "reward_spec": str(spec_path) if spec_path else "built-in defaults",
            "n_train_examples": len(train_rows), "n_val_examples": len(val_rows),
            "num_processes": state.num_processes,
        })
        print(f"done: final {final}; best step {best.get('step')} {best.get('metrics')}; "
              f"{log.tokens_per_s or 0:.1f} train tokens/s")
        return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
