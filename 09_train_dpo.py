"""DPO from the SFT checkpoint on the preference pairs of 08, with TRL's DPOTrainer.

    python 09_train_dpo.py --base_or_sft_ckpt outputs/run_001/03_sft        # its ckpt_sft/best (= --policy_ckpt)
    python 09_train_dpo.py --beta 0.05 --loss_type ipo --learning_rate 5e-5  # = --algorithm.beta ...
    python 09_train_dpo.py --base_or_sft_ckpt smollm2-135m                  # from the base model
    python 09_train_dpo.py --resume                                         # from the last trainer checkpoint
    python 09_train_dpo.py --quick_test                                     # 16 pairs, 2 steps
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml 09_train_dpo.py --quick_test

Reads outputs/<run_id>/08_preferences/pairs.jsonl (--pairs), holds out algorithm.holdout_fraction
of the prompts (seeded, whole prompts; or takes the held-out pairs from --holdout_pairs, built from
prompts of another split) and trains on the rest: beta, loss_type and label_smoothing
from configs/algorithms/dpo.yaml; learning rate, epochs, steps and batch from the config.

Reference policy: the SFT adapter itself is trained (utils.rl.load_policy); TRL's DPOTrainer,
given a PeftModel with a pretrained adapter, copies it into a frozen adapter named "ref" and takes
the reference log-probs under it: exactly the SFT policy, with no second model in memory, the
same mechanism as 05, 06 and 07.

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
  ckpt_dpo/{step_N,best,final}/  LoRA adapter + tokenizer + config.yaml (+ validation.json);
                            best by val exec_acc, ties by val reward_mean
  trainer/checkpoint-N/     optimizer, scheduler and RNG, for --resume
  logs/training_log.json    TRL's names (loss, rewards/accuracies, rewards/margins, rewards/chosen,
                            rewards/rejected, logps/*, kl, ...), eval_* on the held-out pairs, val/*;
                            TensorBoard events beside it
  val_generations/step_N.jsonl  greedy validation generations, scored
  metrics.json, manifest.json
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from utils import cli, rl, runs, training
from utils import config as config_lib
from utils.preferences import preference_accuracy, split_by_prompt
from utils.data import is_id, is_messages

MODULE = "09_dpo"
METHOD = "dpo"
# --quick_test: a smoke run (explicit flags win)
QUICK_TEST = {"training.max_steps": 2, "training.logging_steps": 1, "training.save_steps": 1,
              "validation.eval_steps": 2, "validation.num_samples": 4, "validation.max_new_tokens": 48}
QUICK_TEST_PAIRS = 16
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")


def parse_args(argv=None):
    parser = rl.argument_parser(__doc__, METHOD, QUICK_TEST, f"{QUICK_TEST_PAIRS} pairs, 2 steps")
    parser.add_argument("--base_or_sft_ckpt", dest="policy_ckpt",
                        help="another name for --policy_ckpt (the same forms): DPO may start from the base model or an SFT "
                             "checkpoint")
    parser.add_argument("--pairs", default=None,
                        help="preference pairs (default: outputs/<run_id>/08_preferences/pairs.jsonl)")
    parser.add_argument("--holdout_pairs", default=None,
                        help="held-out preference pairs built (04 + 08) from prompts training never sees, e.g. "
                             "the val split: every --pairs pair trains and these measure preference accuracy "
                             "(default: hold out algorithm.holdout_fraction of the --pairs prompts)")
    return parser.parse_known_args(argv)


# --- helpers ---
def is_turns(value) -> bool:
    """TRL's two forms of a prompt or completion: a list of {role, content} messages, or a text."""
    return isinstance(value, str) or is_messages(value)


# what 09 reads of each line of pairs.jsonl, with the type it must hold: (check, description)
PAIR_FIELDS = {"id": (is_id, "a string"),
               **{column: (is_turns, "a list of {role, content} messages or a text") for column in PAIR_COLUMNS[1:]}}


def load_pairs(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` pairs' PAIR_COLUMNS (utils.runs.read_records): prompt, chosen and rejected in one
    of TRL's forms (is_turns), the same for all three; errors name the file, the line and the column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python 08_build_prefs.py first (or pass --pairs FILE)")
    numbered = runs.read_records(path, PAIR_FIELDS, "08_build_prefs.py")
    for line, pair in numbered:
        if len({isinstance(pair[column], str) for column in PAIR_COLUMNS[1:]}) > 1:
            raise cli.UsageError(f"{path}: line {line}: prompt, chosen and rejected mix messages and texts (TRL takes "
                                 f"one form); rebuild it with python 08_build_prefs.py")
    return [{column: pair[column] for column in PAIR_COLUMNS} for _, pair in numbered[:limit]]


def smoke_pairs(train_path: Path, limit: int) -> list[dict]:
    """--quick_test only, when 08 found no pairs (a smoke-sized SFT policy rarely writes valid JSON):
    gold answer vs. a non-answer for the first train prompts, so the DPO plumbing still runs.
    Such a run measures nothing; the manifest says where its pairs came from."""
    return [{"id": example["id"], "prompt": example["prompt"], "chosen": example["completion"],
             "rejected": [{"role": "assistant", "content": "I do not know."}]}
            for example in rl.read_split(train_path, "--train_jsonl")[:limit]]


class SequenceKL(TrainerCallback):
    """Adds `kl` (module docstring) to each DPO log entry from TRL's reward metrics:
    rewards/{chosen,rejected} = beta * mean(log pi - log pi_ref), so kl = -(rc + rr) / (2 beta).
    List it before JsonLogCallback, which writes the entry."""

    def __init__(self, beta: float):
        self.beta = beta

    def on_log(self, args, state, control, logs=None, **kwargs):
        for prefix in ("", "eval_"):
            chosen, rejected = (logs or {}).get(f"{prefix}rewards/chosen"), (logs or {}).get(f"{prefix}rewards/rejected")
            if chosen is not None and rejected is not None and state.log_history:
                state.log_history[-1][f"{prefix}kl"] = -(chosen + rejected) / (2 * self.beta)


def build_trainer(cfg: dict, model, tokenizer, train_pairs, holdout, trainer_dir: Path, callbacks):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    algo = cfg["algorithm"]
    # the held-out pairs are the trainer's eval set: eval_loss, eval_rewards/accuracies... every eval_steps
    eval_steps = cfg["validation"]["eval_steps"] if holdout else None
    args = DPOConfig(**training.training_arguments(cfg, trainer_dir, eval_steps),
                     beta=algo["beta"], loss_type=algo["loss_type"], label_smoothing=algo["label_smoothing"],
                     max_length=cfg["model"]["max_length"])
    # a PeftModel with the start adapter and no ref_model: TRL adds the frozen "ref" copy (the reference)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                      eval_dataset=Dataset.from_list(holdout) if holdout else None, processing_class=tokenizer,
                      callbacks=callbacks)


def holdout_logps(trainer, batch_size: int) -> dict[str, list[float]]:
    """Summed completion log-probs of each held-out pair under the policy and the reference
    (the same network under TRL's frozen "ref" adapter), tokenized exactly as the trainer does."""
    import contextlib

    import torch
    from trl.trainer.utils import use_adapter

    dataset, model = trainer.eval_dataset, trainer.accelerator.unwrap_model(trainer.model)
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
            for who, context in (("policy", contextlib.nullcontext()), ("ref", use_adapter(model, rl.REFERENCE_ADAPTER))):
                with torch.no_grad(), context, trainer.accelerator.autocast():
                    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
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
            "holdout_logp_acc_after": after["logp_accuracy"], "holdout_reward_margin_after": after["reward_margin"],
            # per pair, for paired CIs over prompts (pairs of one prompt are not independent)
            "holdout_pair_prompt_ids": [str(pair["id"]) for pair in holdout],
            "holdout_logp_correct_before": [c > r for c, r in zip(*ref)],
            "holdout_logp_correct_after": [c > r for c, r in zip(logps["policy_chosen"], logps["policy_rejected"])]}


# --- main ---
def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens, QUICK_TEST)
    state = training.process_state()  # first: every process then loads its model onto its own device
    seed, root = cfg["training"]["seed"], Path(cfg["paths"]["output_root"])
    folder = rl.output_folder(args, cfg, MODULE)
    ckpt_dir, trainer_dir = folder / f"ckpt_{METHOD}", folder / "trainer"
    log_path = folder / "logs" / "training_log.json"
    runs.seed_everything(seed)
    with runs.Manifest(folder, MODULE, args, cfg, seed, main_process=state.is_main_process) as manifest:
        # --- data ---
        data_dir = Path(cfg["paths"]["data_dir"])
        pairs_path = Path(args.pairs) if args.pairs else root / args.run_id / "08_preferences" / "pairs.jsonl"
        pairs = load_pairs(pairs_path, QUICK_TEST_PAIRS if args.quick_test else None)
        pairs_source = str(pairs_path)
        if not pairs and not args.quick_test:
            raise cli.UsageError(f"{pairs_path} holds no pairs: see its stats.txt (lower --min_margin, or "
                                 f"sample more candidates with 04)")
        if not pairs:
            train_path = Path(args.train_jsonl or data_dir / "train.jsonl")
            pairs = smoke_pairs(train_path, QUICK_TEST_PAIRS)
            pairs_source = (f"quick_test smoke pairs (gold vs. a non-answer) from {train_path}: "
                            f"{pairs_path} is empty")
            manifest.add_input("smoke_pairs_from", train_path)
            print(f"WARNING: {pairs_source}; this run only tests the plumbing", flush=True)
        if args.holdout_pairs:
            train_pairs, holdout = pairs, load_pairs(Path(args.holdout_pairs), None)
            if shared := {pair["id"] for pair in holdout} & {pair["id"] for pair in pairs}:
                raise cli.UsageError(f"--holdout_pairs {args.holdout_pairs} shares {len(shared)} prompts with "
                                     f"{pairs_path} (e.g. {sorted(map(str, shared))[0]}): held-out pairs must "
                                     f"come from prompts training never sees (04 --split val)")
        else:
            train_pairs, holdout = split_by_prompt(pairs, cfg["algorithm"]["holdout_fraction"], seed)
        if not train_pairs:
            raise cli.UsageError(f"{pairs_path}: no pairs left for training after holding out "
                                 f"{cfg['algorithm']['holdout_fraction']:.0%} of the prompts")
        val_path = Path(args.val_jsonl or data_dir / "val.jsonl")
        val = rl.read_split(val_path, "--val_jsonl")[:cfg["validation"]["num_samples"]]
        spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
        ckpt = rl.start_checkpoint(args, cfg)

        # --- model ---
        resume_from = rl.prepare_run_folder(folder, METHOD, args.resume)
        model, tokenizer, policy = rl.load_policy(ckpt, cfg)
        precision = training.mixed_precision(cfg)
        callbacks, validation, checkpoints, log = rl.trainer_callbacks(
            cfg, folder, METHOD, tokenizer, val, spec, resumed=resume_from is not None,
            extra=[SequenceKL(cfg["algorithm"]["beta"])])
        trainer = build_trainer(cfg, model, tokenizer, train_pairs, holdout, trainer_dir, callbacks)
        for name, path in (("pairs", pairs_path), ("holdout_pairs", args.holdout_pairs), ("val", val_path),
                           ("policy_ckpt", ckpt),
                           ("reward_spec", spec_path), ("resume", resume_from)):
            if path is not None and Path(path).exists():
                manifest.add_input(name, path)
        manifest.metrics.update(pairs_source=pairs_source, dtype=policy["dtype"], base_model=policy["base_model"],
                                precision_note=precision["note"], train_pairs=len(train_pairs),
                                holdout_pairs=len(holdout), num_processes=state.num_processes)
        manifest.write()
        if state.is_main_process:
            print(f"DPO: {len(train_pairs)} train pairs, {len(holdout)} held out "
                  f"({len({p['id'] for p in holdout})} prompts), {len(val)} val examples, beta "
                  f"{cfg['algorithm']['beta']}, loss {cfg['algorithm']['loss_type']}, {precision['note']}, "
                  f"start {ckpt}", flush=True)

        # --- train ---
        if resume_from:
            training.restore_token_count(trainer, resume_from)
        output = trainer.train(resume_from_checkpoint=resume_from)

        # --- save ---
        if state.is_main_process:
            final = checkpoints.save_final(trainer.model, trainer.state.global_step)
            log.write(trainer.state)
            best = checkpoints.best or {}
            metrics = {"global_step": trainer.state.global_step, "train_loss_mean": output.training_loss,
                       "train_runtime_s": output.metrics.get("train_runtime"), "train_tokens_per_s":
                       log.tokens_per_s, "peak_rss_gb": log.peak_rss_gb, "peak_gpu_gb": log.peak_gpu_gb,
                       "best_step": best.get("step"),
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
                               ("trainer", trainer_dir), ("metrics", folder / "metrics.json")):
                manifest.add_output(name, path)
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
                  + f" -> {folder}", flush=True)
        return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
