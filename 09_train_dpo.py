"""DPO from the SFT checkpoint on the preference pairs of 08, with TRL's DPOTrainer.

    python 09_train_dpo.py --base_or_sft_ckpt outputs/run_001/03_sft        # its ckpt_sft/best
    python 09_train_dpo.py --algorithm.beta 0.05 --algorithm.loss_type ipo --learning_rate 5e-5
    python 09_train_dpo.py --base_or_sft_ckpt smollm2-135m                  # from the base model
    python 09_train_dpo.py --resume                                         # from the last trainer checkpoint
    python 09_train_dpo.py --quick_test                                     # 16 pairs, 2 steps
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml 09_train_dpo.py --quick_test

Reads outputs/<run_id>/08_preferences/pairs.jsonl (--pairs), holds out algorithm.holdout_fraction
of the prompts (seeded, whole prompts) and trains on the rest: beta, loss_type and label_smoothing
from configs/algorithms/dpo.yaml; learning rate, epochs, steps and batch from the config.

Reference policy: the SFT adapter is merged into the base weights and a fresh LoRA adapter is
trained on top. TRL's DPOTrainer takes a PEFT model's reference log-probs with the adapters
disabled, which is then exactly the SFT policy, with no second model in memory. (Without the
merge, disabling the adapters would give the base model as the reference.) With lora.enabled
false the whole merged model is trained against a frozen copy of it.

Held-out preference accuracy, before and after training (metrics.json, manifest):
  holdout_pref_acc_before  the SFT policy's own ranking: log pi_sft(chosen) > log pi_sft(rejected).
                           DPO's implicit reward beta * (log pi - log pi_ref) is 0 for every pair at
                           the start (pi = pi_ref), so its accuracy would be 0 by construction.
  holdout_pref_acc_after   DPO's definition (TRL's rewards/accuracies): r(chosen) > r(rejected)
  holdout_logp_acc_after   the trained policy's own ranking, comparable to the before value
KL: DPO samples nothing, so `kl` is measured on the pair completions (samples of the SFT policy,
from 04): the mean per completion of log pi_ref(y|x) - log pi(y|x), a sequence-level estimate of
KL(pi_ref || pi). The on-policy methods log KL(pi || pi_ref) on their own samples.

Writes outputs/<run_id>/09_dpo/:
  reference_model/          the SFT policy merged into the base (when the start is a LoRA adapter):
                            the reference, and the base model every DPO adapter names
  ckpt_dpo/{step_N,best,final}/  LoRA adapter + tokenizer + config.yaml (+ validation.json);
                            best by val exec_acc, ties by val reward_mean
  trainer/checkpoint-N/     optimizer, scheduler and RNG, for --resume
  logs/training_log.json    TRL's names (loss, rewards/accuracies, rewards/margins, rewards/chosen,
                            rewards/rejected, logps/*, kl, ...), eval_* on the held-out pairs, val/*
  val_generations/step_N.jsonl  greedy validation generations, scored
  metrics.json, manifest.json
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

from utils import config as config_lib
from utils import runs, training
from utils.modeling import holds_merged_adapter
from utils.preferences import preference_accuracy, split_by_prompt

MODULE = "09_dpo"
METHOD = "dpo"
# --quick_test: a smoke run (explicit flags win)
QUICK_TEST = {"training.max_steps": 2, "training.logging_steps": 1, "training.save_steps": 1,
              "validation.eval_steps": 2, "validation.num_samples": 4, "validation.max_new_tokens": 48}
QUICK_TEST_PAIRS = 16
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")


class DPOInputError(RuntimeError):
    """A missing or unusable input; the message names it and the fix."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser, algo=METHOD)
    parser.add_argument("--base_or_sft_ckpt", default=None,
                        help="the start: an SFT run folder (uses its ckpt_sft/best), a checkpoint folder, or a "
                             "base model (config name, folder or hub id) (default: outputs/<run_id>/03_sft)")
    parser.add_argument("--pairs", default=None,
                        help="preference pairs (default: outputs/<run_id>/08_preferences/pairs.jsonl)")
    parser.add_argument("--val_jsonl", default=None, help="(default: <paths.data_dir>/val.jsonl)")
    parser.add_argument("--reward_spec", default=None,
                        help="reward_spec.yaml for validation (default: outputs/<run_id>/02_rewards/"
                             "reward_spec.yaml if present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {QUICK_TEST_PAIRS} pairs, 2 steps, "
                             f"{QUICK_TEST['validation.num_samples']} val examples")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last trainer checkpoint in the output folder (optimizer, "
                             "scheduler, RNG, training log and best so far)")
    return parser.parse_known_args(argv)


# --- helpers ---
def resolve_config(args, extra_tokens) -> dict:
    """Model YAML < dpo.yaml < --quick_test values < command line."""
    set_by_shortcut = {config_lib.SHORTCUTS[name] for name in config_lib.SHORTCUTS
                       if getattr(args, name, None) is not None}
    quick = [token for key, value in QUICK_TEST.items() if key not in set_by_shortcut
             for token in (f"--{key}", str(value))] if args.quick_test else []
    return config_lib.from_args(args, [*quick, *extra_tokens])


def resolve_start(given: str | None, cfg: dict, run_id: str) -> tuple[str, bool]:
    """(what load_model takes, whether it is a LoRA adapter to merge)."""
    folder = Path(given) if given else Path(cfg["paths"]["output_root"]) / run_id / "03_sft"
    if (folder / "ckpt_sft" / "best").is_dir():
        folder = folder / "ckpt_sft" / "best"
    if (folder / "adapter_config.json").is_file():
        return str(folder), True
    if (folder / "config.json").is_file():
        return str(folder), False
    if given and not folder.exists():
        return given, False  # a base model: config name or hub id (load_model explains a bad one)
    raise DPOInputError(f"--base_or_sft_ckpt {folder}: no checkpoint there (expected adapter_config.json, "
                        f"config.json or ckpt_sft/best/). Train one with python 03_sft_train.py, pass a checkpoint "
                        f"folder such as outputs/run_001/03_sft/ckpt_sft/final, or a base model (smollm2-135m)")


def load_pairs(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise DPOInputError(f"{path} not found: run python 08_build_prefs.py first (or pass --pairs FILE)")
    pairs = runs.read_jsonl(path)[:limit]
    for line, pair in enumerate(pairs, start=1):
        missing = [column for column in PAIR_COLUMNS if column not in pair]
        if missing:
            raise DPOInputError(f"{path}: line {line} lacks {', '.join(missing)}; rebuild it with "
                                f"python 08_build_prefs.py")
    return [{column: pair[column] for column in PAIR_COLUMNS} for pair in pairs]


def smoke_pairs(train_path: Path, limit: int) -> list[dict]:
    """--quick_test only, when 08 found no pairs (a smoke-sized SFT policy rarely writes valid JSON):
    gold answer vs. a non-answer for the first train prompts, so the DPO plumbing still runs.
    Such a run measures nothing; the manifest says where its pairs came from."""
    if not train_path.is_file():
        raise DPOInputError(f"--quick_test: the pairs file is empty and {train_path} (for smoke pairs) is missing: "
                            f"run python 01_prepare_dataset.py first")
    return [{"id": example["id"], "prompt": example["prompt"], "chosen": example["completion"],
             "rejected": [{"role": "assistant", "content": "I do not know."}]}
            for example in runs.read_jsonl(train_path)[:limit]]


def resume_checkpoint(trainer_dir: Path) -> str:
    """The trainer checkpoint --resume continues from (the newest checkpoint-N)."""
    last = training.last_trainer_checkpoint(trainer_dir)
    if last is None:
        raise DPOInputError(f"--resume: no trainer checkpoint (checkpoint-N) in {trainer_dir}; "
                            f"run without --resume to start training")
    return last


def clear_previous_run(folder: Path) -> None:
    """A fresh run must not mix its checkpoints and logs with an earlier run's."""
    for name in ("trainer", f"ckpt_{METHOD}", "logs", "val_generations", "reference_model"):
        if (folder / name).exists():
            print(f"fresh run: removing the previous {folder / name} (use --resume to continue it)")
            shutil.rmtree(folder / name)


def load_start(start: str, is_adapter: bool, reference_dir: Path, resume: bool, is_main: bool):
    """The model DPO starts from, with an SFT adapter merged in (saved once as reference_dir)."""
    from utils.modeling import load_model, load_tokenizer

    if is_adapter and resume:  # the reference the run started with, whatever --base_or_sft_ckpt says now
        if not (reference_dir / "config.json").is_file():
            raise DPOInputError(f"--resume: {reference_dir} is missing; start the run again without --resume")
        return load_model(str(reference_dir), dtype="float32").requires_grad_(True)
    model = load_model(start, dtype="float32")  # fp32 master weights; autocast per the dtype policy
    model.requires_grad_(True)  # merging keeps PEFT's frozen flags; a full fine-tune (lora.enabled false) trains all
    if is_adapter and is_main:
        model.save_pretrained(str(reference_dir))
        load_tokenizer(start).save_pretrained(str(reference_dir))
    return model


def build_trainer(cfg: dict, model, ref_model, tokenizer, train_pairs, holdout, trainer_dir: Path, callbacks):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class DPOTrainerWithKL(DPOTrainer):
        """TRL's DPOTrainer, also logging `kl` (module docstring) from its reward metrics:
        rewards/{chosen,rejected} = beta * mean(log pi - log pi_ref), so kl = -(rc + rr) / (2 beta)."""

        def log(self, logs, start_time=None):
            metrics = self._metrics["train" if self.model.training else "eval"]
            if metrics.get("rewards/chosen") and metrics.get("rewards/rejected"):
                chosen, rejected = (sum(metrics[k]) / len(metrics[k]) for k in ("rewards/chosen", "rewards/rejected"))
                metrics["kl"] = [-(chosen + rejected) / (2 * self.beta)]
            super().log(logs, start_time)

    algo = cfg["algorithm"]
    # the held-out pairs are the trainer's eval set: eval_loss, eval_rewards/accuracies... every eval_steps
    eval_steps = cfg["validation"]["eval_steps"] if holdout else None
    args = DPOConfig(**training.training_arguments(cfg, trainer_dir, eval_steps),
                     beta=algo["beta"], loss_type=algo["loss_type"], label_smoothing=algo["label_smoothing"],
                     max_length=cfg["model"]["max_length"])
    return DPOTrainerWithKL(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(train_pairs),
                            eval_dataset=Dataset.from_list(holdout) if holdout else None, processing_class=tokenizer,
                            peft_config=training.lora_config(cfg) if cfg["lora"]["enabled"] else None,
                            callbacks=callbacks)


def holdout_logps(trainer, batch_size: int) -> dict[str, list[float]]:
    """Summed completion log-probs of each held-out pair under the policy and the reference
    (the same network with the adapter disabled, or the separate reference model of a full
    fine-tune), tokenized exactly as the trainer does."""
    import torch

    dataset, model = trainer.eval_dataset, trainer.accelerator.unwrap_model(trainer.model)
    ref_model = trainer.accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else model
    max_length, pad = trainer.args.max_length, trainer.processing_class.pad_token_id
    out = {f"{who}_{side}": [] for who in ("policy", "ref") for side in ("chosen", "rejected")}
    was_training = model.training
    model.eval()
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        for side in ("chosen", "rejected"):
            seqs = [(prompt + completion)[:max_length]  # the trainer truncates the same way (keep_start)
                    for prompt, completion in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=trainer.accelerator.device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=ids.device)
            completion = torch.tensor([[0] * len(p) + [1] * (len(s) - len(p)) + [0] * (width - len(s))
                                       for p, s in zip(rows["prompt_ids"], seqs)], device=ids.device)
            no_adapter = model.disable_adapter() if trainer.ref_model is None else contextlib.nullcontext()
            for who, net, context in (("policy", model, contextlib.nullcontext()), ("ref", ref_model, no_adapter)):
                with torch.no_grad(), context, trainer.accelerator.autocast():
                    logits = net(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                token_logps = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
                out[f"{who}_{side}"] += (token_logps * completion[:, 1:]).sum(1).tolist()
    model.train(was_training)
    return out


def holdout_metrics(trainer, holdout: list[dict], beta: float, batch_size: int) -> dict:
    """Preference accuracy on the held-out pairs (module docstring). The reference is the SFT
    policy, so its log-probs give the before values; one pass after training measures both."""
    logps = holdout_logps(trainer, batch_size)
    ref = (logps["ref_chosen"], logps["ref_rejected"])
    before = preference_accuracy(*ref, *ref, beta=beta)
    after = preference_accuracy(logps["policy_chosen"], logps["policy_rejected"], *ref, beta=beta)
    return {"holdout_n_pairs": after["n_pairs"], "holdout_n_prompts": len({pair["id"] for pair in holdout}),
            "holdout_pref_acc_before": before["logp_accuracy"], "holdout_pref_acc_after": after["reward_accuracy"],
            "holdout_logp_acc_after": after["logp_accuracy"], "holdout_reward_margin_after": after["reward_margin"]}


# --- main ---
def main(args, extra_tokens=()) -> int:
    try:
        cfg = resolve_config(args, extra_tokens)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch
    from accelerate import PartialState

    from utils.modeling import ModelLoadError, load_tokenizer, resolve_model_path

    # cpu=True without a GPU: under `accelerate launch` the processes then join over gloo (as the
    # trainer's use_cpu does); without it each would believe it is the only, main, process
    state = PartialState(cpu=not torch.cuda.is_available())
    seed, root = cfg["training"]["seed"], Path(cfg["paths"]["output_root"])
    folder = runs.module_dir(args.run_id, MODULE, args.output_dir, root)
    ckpt_dir, trainer_dir, reference_dir = folder / f"ckpt_{METHOD}", folder / "trainer", folder / "reference_model"
    log_path = folder / "logs" / "training_log.json"
    runs.seed_everything(seed)
    manifest = runs.Manifest(folder, MODULE, vars(args), cfg, seed) if state.is_main_process else None
    try:
        with manifest or contextlib.nullcontext():
            # --- data ---
            pairs_path = Path(args.pairs) if args.pairs else root / args.run_id / "08_preferences" / "pairs.jsonl"
            pairs = load_pairs(pairs_path, QUICK_TEST_PAIRS if args.quick_test else None)
            pairs_source = str(pairs_path)
            if not pairs and not args.quick_test:
                raise DPOInputError(f"{pairs_path} holds no pairs: see its stats.txt (lower --min_margin, or "
                                    f"sample more candidates with 04)")
            if not pairs:
                train_path = Path(cfg["paths"]["data_dir"]) / "train.jsonl"
                pairs = smoke_pairs(train_path, QUICK_TEST_PAIRS)
                pairs_source = (f"quick_test smoke pairs (gold vs. a non-answer) from {train_path}: "
                                f"{pairs_path} is empty")
                print(f"WARNING: {pairs_source}; this run only tests the plumbing", flush=True)
            train_pairs, holdout = split_by_prompt(pairs, cfg["algorithm"]["holdout_fraction"], seed)
            if not train_pairs:
                raise DPOInputError(f"{pairs_path}: no pairs left for training after holding out "
                                    f"{cfg['algorithm']['holdout_fraction']:.0%} of the prompts")
            val_path = Path(args.val_jsonl) if args.val_jsonl else Path(cfg["paths"]["data_dir"]) / "val.jsonl"
            if not val_path.is_file():
                raise DPOInputError(f"{val_path} not found: run python 01_prepare_dataset.py first "
                                    f"(or pass --val_jsonl FILE)")
            val = runs.read_jsonl(val_path)[:cfg["validation"]["num_samples"]]
            spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
            start, is_adapter = resolve_start(args.base_or_sft_ckpt, cfg, args.run_id)
            if is_adapter or holds_merged_adapter(start):  # bf16 autocast would round the merged SFT
                cfg["model"]["dtype"] = "float32"              # update away (utils.modeling.load_model)

            # --- model ---
            resume_from = resume_checkpoint(trainer_dir) if args.resume else None
            if resume_from is None and state.is_main_process:
                clear_previous_run(folder)
            state.wait_for_everyone()  # nobody reads the folder while the main process clears it
            model = load_start(start, is_adapter, reference_dir, args.resume, state.is_main_process)
            # full fine-tuning (lora.enabled false): TRL would load the reference from the model's
            # config path, which names the base model, not the merged SFT policy: pass it explicitly
            ref_model = (None if cfg["lora"]["enabled"]
                         else load_start(start, is_adapter, reference_dir, args.resume, is_main=False))
            tokenizer = load_tokenizer(start)
            precision = training.mixed_precision(cfg)
            validation = training.ValidationCallback(
                val, tokenizer, folder / "val_generations", spec=spec, every=cfg["validation"]["eval_steps"],
                max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"],
                samples_format="jsonl")
            checkpoints = training.CheckpointCallback(ckpt_dir, tokenizer, cfg, validation=validation,
                                                      resume=args.resume,
                                                      save_total_limit=cfg["training"]["save_total_limit"])
            log = training.JsonLogCallback(log_path)
            callbacks = [training.NonFiniteGuard(ckpt_dir, trainer_dir), validation, checkpoints, log]
            trainer = build_trainer(cfg, model, ref_model, tokenizer, train_pairs, holdout, trainer_dir, callbacks)
            if cfg["lora"]["enabled"]:  # every DPO adapter sits on the merged SFT model (or the start model)
                base = reference_dir if is_adapter else resolve_model_path(start)
                trainer.model.peft_config["default"].base_model_name_or_path = str(base)
            if manifest is not None:
                manifest.add_input("pairs", pairs_path)
                if pairs_source != str(pairs_path):
                    manifest.add_input("smoke_pairs_from", Path(cfg["paths"]["data_dir"]) / "train.jsonl")
                manifest.add_input("val", val_path)
                if Path(start).is_dir():
                    manifest.add_input("base_or_sft_ckpt", start)
                if spec_path is not None:
                    manifest.add_input("reward_spec", spec_path)
                if resume_from:
                    manifest.add_input("resume", resume_from)
                manifest.metrics.update(pairs_source=pairs_source, dtype=precision["dtype"],
                                        precision_note=precision["note"],
                                        train_pairs=len(train_pairs), holdout_pairs=len(holdout),
                                        num_processes=state.num_processes)
                manifest.write()
                print(f"DPO: {len(train_pairs)} train pairs, {len(holdout)} held out "
                      f"({len({p['id'] for p in holdout})} prompts), {len(val)} val examples, beta "
                      f"{cfg['algorithm']['beta']}, loss {cfg['algorithm']['loss_type']}, {precision['note']}, "
                      f"start {start}" + (" (merged)" if is_adapter else ""), flush=True)

            # --- train ---
            output = trainer.train(resume_from_checkpoint=resume_from)

            # --- save ---
            if manifest is not None:
                final = checkpoints.save_final(trainer.model, trainer.state.global_step)
                log.write(trainer.state)
                best = checkpoints.best or {}
                metrics = {"global_step": trainer.state.global_step, "train_loss_mean": output.training_loss,
                           "train_runtime_s": output.metrics.get("train_runtime"), "train_tokens_per_s":
                           log.tokens_per_s, "best_step": best.get("step"),
                           **{f"best_val_{k}": best.get("metrics", {}).get(k) for k in ("exec_acc", "reward_mean")},
                           **{f"val/{k}": v for k, v in (validation.latest or {}).get("metrics", {}).items()
                              if k in ("exec_acc", "prog_acc", "format_rate", "reward_mean")}}
                if holdout:
                    metrics.update(holdout_metrics(trainer, holdout, cfg["algorithm"]["beta"],
                                                   cfg["training"]["per_device_eval_batch_size"]))
                manifest.metrics.update(metrics)
                runs.atomic_write_json(folder / "metrics.json", metrics)
                for name, path in (("ckpt_final", final), ("ckpt_best", ckpt_dir / "best"),
                                   ("training_log", log_path), ("val_generations", folder / "val_generations"),
                                   ("trainer", trainer_dir), ("metrics", folder / "metrics.json"),
                                   *((("reference_model", reference_dir),) if is_adapter else ())):
                    manifest.add_output(name, path)
                print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
                      + f" -> {folder}", flush=True)
    except (DPOInputError, ModelLoadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*parse_args()))
