"""Shared setup of the TRL online RL trainers (06 GRPO, 07 RLOO): everything but the algorithm.

    cfg = resolve_config(args, extra_tokens)            # model YAML < algorithm YAML < --quick_test < CLI
    metrics = run("06_grpo", cfg, args, build_trainer)  # data, policy, callbacks, train, save, manifest

run() does the same for every method (same data, prompts, reward functions and weights, sampling
settings, validation protocol, checkpoint layout and log names); the script's build_trainer adds
its algorithm's own hyperparameters to trainer_arguments() and builds the TRL trainer. Pieces:

    resolve_policy_ckpt("outputs/run_001/03_sft")      # -> .../03_sft/ckpt_sft/best
    load_policy(ckpt, cfg)                             # (peft model, SFT adapter trainable; tokenizer; info)
    load_prompts("datasets/finqa_processed/train.jsonl")  # Dataset: prompt + the reward columns
    reward_functions(spec)                             # (one TRL reward function per component, weights)
    leave_one_out_baselines(rewards, k); LeaveOneOutSampleLog (RLOO's per-sample reward log)

The policy is the base model with the SFT LoRA adapter loaded trainable. TRL 1.16 handles a
PeftModel with a pretrained adapter by copying it into a frozen adapter named "ref" and taking
the reference log-probs with that adapter active (grpo_trainer.py / rloo_trainer.py, "ref"
adapter), so the KL term is measured against the SFT policy, not the base model, with no second
model in memory. (Had TRL disabled the adapters instead, the reference would have been the base
model; merging the SFT adapter into the base and training a fresh LoRA would have been the fix.)
Continuing the SFT adapter also keeps every RL checkpoint a plain LoRA adapter over the base
model, loadable by utils.modeling.load_model like the SFT checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from utils import config as config_lib
from utils import modeling, runs, training
from utils.rewards import trl_reward_functions


# --- leave-one-out baseline ----------------------------------------------------------------

def leave_one_out_baselines(rewards: Sequence[float], group_size: int) -> list[float]:
    """Each reward's leave-one-out baseline: the mean of the other group_size - 1 rewards of its group.

    Args:
        rewards: rewards in consecutive groups (TRL's order: a prompt's completions are adjacent).
        group_size: completions per prompt (num_generations), at least 2.
    Returns:
        One baseline per reward.
    Example: leave_one_out_baselines([1.0, 0.0, 0.0, 1.0], 2) -> [0.0, 1.0, 1.0, 0.0]
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs groups of 2 or more, got group_size {group_size}")
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    baselines = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        total = sum(group)
        baselines += [(total - r) / (group_size - 1) for r in group]
    return baselines


# --- policy ----------------------------------------------------------------------------------

def _is_checkpoint(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def resolve_policy_ckpt(given: str | Path) -> Path:
    """The checkpoint behind --policy_ckpt: a checkpoint folder, or an SFT run folder's ckpt_sft/best.

    Accepts a checkpoint (LoRA adapter or full model), a ckpt_sft folder, an SFT module folder
    (outputs/run_001/03_sft) or a run folder (outputs/run_001).
    """
    path = Path(given)
    for folder in (path, path / "best", path / "ckpt_sft" / "best", path / "03_sft" / "ckpt_sft" / "best"):
        if _is_checkpoint(folder):
            return folder
    where = path if path.is_dir() else path.parent
    held = ", ".join(sorted(p.name for p in where.iterdir())[:20]) if where.is_dir() else "(missing too)"
    raise FileNotFoundError(
        f"--policy_ckpt {path}: no checkpoint there (adapter_config.json or config.json) and no "
        f"ckpt_sft/best inside; {where} holds: {held or 'nothing'}. Train the SFT policy first "
        f"(python 03_sft_train.py) or pass a checkpoint folder such as .../03_sft/ckpt_sft/final")


def load_policy(ckpt: str | Path, cfg: dict):
    """The trainable policy: the base model with the checkpoint's LoRA adapter, trainable.

    Args:
        ckpt: a LoRA adapter folder (the SFT checkpoint), or a full model folder, which gets a
            fresh LoRA from cfg["lora"] (RL straight from a model; its reference is that model).
        cfg: the resolved config (model.dtype, lora).
    Returns:
        (peft model in train mode, tokenizer, {"dtype": frozen base weights' dtype,
        "base_model": base folder or hub id}).

    The frozen base weights take the config's dtype (bf16 where it is fast, DESIGN.md), the
    trainable LoRA weights stay float32: peft upcasts adapters, so the optimizer keeps fp32
    master weights, and sampling, which dominates RL time, runs at bf16 speed. A base that holds
    a merged adapter (a PPO or DPO checkpoint's reference_model) is the exception: it trains in
    float32 throughout, as PPO and DPO do, because bf16 would round its merged update away; cfg's
    model.dtype is set to float32 so the trainer's autocast follows.
    """
    from peft import PeftModel, get_peft_model

    ckpt = Path(ckpt)
    base = modeling._adapter_base(ckpt)  # None for a full model folder
    if modeling.holds_merged_adapter(base or ckpt):
        cfg["model"]["dtype"] = "float32"
    dtype = modeling.resolve_dtype(cfg["model"].get("dtype") or "auto")
    model = modeling.load_model(base or str(ckpt), dtype=dtype)
    if base is not None:
        model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
    else:
        model = get_peft_model(model, training.lora_config(cfg))
    model.train()
    tokenizer = modeling.load_tokenizer(ckpt, chat_template=None)
    tokenizer.padding_side = "left"
    return model, tokenizer, {"dtype": str(dtype).replace("torch.", ""), "base_model": base or str(ckpt)}


# --- data and rewards ------------------------------------------------------------------------

# What the reward API reads from a processed example (plus the prompt that TRL samples from).
REWARD_COLUMNS = ("id", "table", "exe_ans", "target_program", "target_answer")


def load_prompts(path: str | Path, limit: int | None = None):
    """A processed split as a datasets.Dataset of prompt + REWARD_COLUMNS (the first `limit` rows).

    datasets.load_dataset("json") reads the mixed exe_ans column (numbers, "yes"/"no") as a Json
    feature; Dataset.from_list cannot.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python 01_prepare_dataset.py (or pass "
                                f"--paths.data_dir to a folder with train.jsonl and val.jsonl)")
    data = datasets.load_dataset("json", data_files=str(path), split="train")
    missing = [c for c in ("prompt", *REWARD_COLUMNS) if c not in data.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; rerun python 01_prepare_dataset.py")
    data = data.select_columns(["prompt", *REWARD_COLUMNS])
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def reward_functions(spec):
    """utils.rewards.trl_reward_functions(spec), given only the dataset's columns.

    TRL 1.16 also passes prompts, completion_ids, trainer_state, log_extra and log_metric; the
    reward API builds each example from the per-row columns, so only those reach it.
    Returns (functions, weights) for reward_funcs / reward_weights.
    """
    functions, weights = trl_reward_functions(spec)

    def columns_only(function):
        def reward(completions, **columns):
            return function(completions, **{k: columns[k] for k in REWARD_COLUMNS if k in columns})
        reward.__name__ = function.__name__  # TRL logs rewards/<__name__>/mean
        return reward

    return [columns_only(f) for f in functions], weights


# --- trainer additions -----------------------------------------------------------------------

class LeaveOneOutSampleLog:
    """RLOOTrainer mixin: appends each training generation batch, one JSON line per sample, to
    `samples_path`: its total reward, the components, the leave-one-out baseline (the mean of
    the other num_generations - 1 totals of its prompt) and TRL's advantage.

    RLOOTrainer's own baseline uses the reward minus beta x the sample's KL to the reference,
    so with beta = 0 and normalize_advantages off, advantage == reward - baseline exactly;
    otherwise the advantage also carries the KL term's own leave-one-out difference.
    """

    samples_path: Path | None = None
    _started = False  # set at the first batch this process records

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training and self.samples_path is not None:
            self._record_samples(inputs)
        return output

    def _record_samples(self, inputs) -> None:
        from accelerate.utils import gather_object

        ids = gather_object([str(example.get("id")) for example in inputs])  # every process joins
        if not self.accelerator.is_main_process:
            return
        n = len(ids)  # TRL's _logs hold the latest gathered generation batch (at most this many)
        components = {name: list(self._logs["rewards"][name])[-n:] for name in self.reward_func_names}
        weights = dict(zip(self.reward_func_names, self.reward_weights.tolist()))
        totals = [sum(weights[name] * values[i] for name, values in components.items()) for i in range(n)]
        baselines = leave_one_out_baselines(totals, self.num_generations)
        advantages = list(self._logs["advantages"])[-n:]
        step = self.state.global_step + 1  # the optimizer step that trains on these samples
        rows = [{"step": step, "group": i // self.num_generations, "id": ids[i], "reward": totals[i],
                 "baseline": baselines[i], "advantage": advantages[i],
                 "rewards": {name: values[i] for name, values in components.items()}} for i in range(n)]
        path = self.samples_path
        if not self._started and path.is_file():  # resumed: drop the steps the interrupted run did after
            runs.atomic_write_jsonl(path, [r for r in runs.read_jsonl(path) if r["step"] < step])
        self._started = True
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


# --- command line and config -----------------------------------------------------------------

# --quick_test: a smoke run (explicit flags still win); 48 new tokens hold the sample's p95 answer (54 tokens),
# shorter budgets cut every JSON answer and leave a constant reward
QUICK_TEST = {"training.max_steps": 2, "training.save_steps": 1, "training.logging_steps": 1,
              "algorithm.num_generations": 2, "training.per_device_train_batch_size": 4,
              "generation.max_new_tokens": 48, "validation.max_new_tokens": 48, "validation.num_samples": 4,
              "validation.eval_steps": 2}
QUICK_TEST_TRAIN_PROMPTS = 8


def parse_args(description: str, method: str, argv=None):
    """The RL scripts' command line: the common flags, the algorithm config, and the inputs."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser, algo=method)
    parser.add_argument("--policy_ckpt", default=None,
                        help="the SFT start: an SFT run folder (uses its ckpt_sft/best) or a checkpoint "
                             "folder (default: outputs/<run_id>/03_sft)")
    parser.add_argument("--train_jsonl", default=None, help="prompts (default: <paths.data_dir>/train.jsonl)")
    parser.add_argument("--val_jsonl", default=None, help="validation (default: <paths.data_dir>/val.jsonl)")
    parser.add_argument("--reward_spec", default=None,
                        help="reward_spec.yaml (default: outputs/<run_id>/02_rewards/reward_spec.yaml if "
                             "present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {QUICK_TEST_TRAIN_PROMPTS} train prompts, 4 val examples, 2 steps of "
                             f"2 prompts x 2 generations, {QUICK_TEST['generation.max_new_tokens']} new tokens")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last trainer checkpoint (trainer/checkpoint-N) in the output folder")
    return parser.parse_known_args(argv)


def resolve_config(args, extra_tokens=()) -> dict:
    """Model YAML < algorithm YAML < --quick_test values < command line."""
    set_by_shortcut = {config_lib.SHORTCUTS[name] for name in config_lib.SHORTCUTS
                       if getattr(args, name, None) is not None}
    quick = [token for key, value in QUICK_TEST.items() if key not in set_by_shortcut
             for token in (f"--{key}", str(value))] if args.quick_test else []
    return config_lib.from_args(args, [*quick, *extra_tokens])


def prepare_folder(folder: Path, method: str, resume: bool) -> str | None:
    """The trainer checkpoint to resume from; a fresh run clears the previous run's outputs."""
    if resume:
        last = training.last_trainer_checkpoint(folder / "trainer")
        if last is None:
            raise FileNotFoundError(f"--resume: no trainer checkpoint (checkpoint-N) in {folder / 'trainer'}; "
                                    f"run without --resume to start training")
        print(f"resuming from {last}")
        return last
    for name in ("trainer", f"ckpt_{method}", "logs", "val_generations"):
        if (folder / name).exists():
            print(f"fresh run: removing the previous {folder / name} (use --resume to continue it)")
            shutil.rmtree(folder / name)
    return None


def trainer_arguments(cfg: dict, folder: Path, reward_weights: list[float]) -> dict:
    """GRPOConfig / RLOOConfig keywords that GRPO and RLOO share: cfg["training"] (utils.training),
    sampling, the KL coefficient, group size, reward weights and TRL's vLLM options."""
    algo = cfg["algorithm"]
    return dict(
        **training.training_arguments(cfg, folder / "trainer"),
        num_generations=algo["num_generations"],
        beta=algo["beta"],
        temperature=algo["temperature"],
        top_p=algo["top_p"],
        max_completion_length=cfg["generation"]["max_new_tokens"],
        reward_weights=reward_weights,
        # the log-probs of sampling and of the update must come from the same function (05 PPO
        # runs without dropout too)
        disable_dropout=True,
        use_vllm=algo["use_vllm"],
        vllm_mode=algo["vllm_mode"],
        vllm_gpu_memory_utilization=algo["vllm_gpu_memory_utilization"],
    )


# --- the run ---------------------------------------------------------------------------------

def run(module: str, cfg: dict, args, build_trainer) -> dict:
    """One GRPO/RLOO run: data, policy, callbacks, training, checkpoints, manifest.

    build_trainer(cfg, trainer_args, inputs, folder) returns the algorithm's TRL trainer, built
    from the shared trainer_arguments() plus its own hyperparameters and the trainer inputs
    (model, reward_funcs, train_dataset, processing_class, callbacks). Returns the manifest metrics.
    """
    method = cfg["algorithm"]["name"]
    print(config_lib.dump(cfg))
    folder = runs.module_dir(args.run_id, module, cfg["paths"]["output_dir"], cfg["paths"]["output_root"])
    ckpt_dir, log_path = folder / f"ckpt_{method}", folder / "logs" / "training_log.json"
    resume_from = prepare_folder(folder, method, args.resume)
    if cfg["training"]["report_to"] == "tensorboard":  # beside the JSON log, as 05 PPO writes it
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(folder / "logs"))
    runs.seed_everything(cfg["training"]["seed"])
    data_dir = Path(cfg["paths"]["data_dir"])
    train_path = Path(args.train_jsonl or data_dir / "train.jsonl")
    val_path = Path(args.val_jsonl or data_dir / "val.jsonl")

    with runs.Manifest(folder, module, args, cfg) as manifest:
        # --- data ---
        train = load_prompts(train_path, QUICK_TEST_TRAIN_PROMPTS if args.quick_test else None)
        val_rows = runs.read_jsonl(val_path)[:cfg["validation"]["num_samples"]]
        spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
        for name, path in (("train", train_path), ("val", val_path), ("reward_spec", spec_path)):
            if path is not None:
                manifest.add_input(name, path)
        print(f"{len(train)} training prompts ({train_path}), {len(val_rows)} validation examples ({val_path}); "
              f"reward spec: {spec_path or 'built-in defaults'}")

        # --- policy ---
        ckpt = resolve_policy_ckpt(args.policy_ckpt or Path(cfg["paths"]["output_root"]) / args.run_id / "03_sft")
        manifest.add_input("policy_ckpt", ckpt)
        model, tokenizer, policy = load_policy(ckpt, cfg)
        precision = training.mixed_precision(cfg)
        print(f"policy: {ckpt} on {policy['base_model']} ({policy['dtype']} base, fp32 LoRA; {precision['note']})")

        # --- train ---
        functions, weights = reward_functions(spec)
        validation = training.ValidationCallback(
            val_rows, tokenizer, folder / "val_generations", spec=spec, every=cfg["validation"]["eval_steps"],
            max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"],
            samples_format="jsonl")
        checkpoints = training.CheckpointCallback(ckpt_dir, tokenizer, cfg, validation=validation, resume=args.resume,
                                                  save_total_limit=cfg["training"]["save_total_limit"])
        log = training.JsonLogCallback(log_path)
        inputs = dict(model=model, reward_funcs=functions, train_dataset=train, processing_class=tokenizer,
                      callbacks=[training.NonFiniteGuard(ckpt_dir, folder / "trainer"), validation, checkpoints, log])
        trainer = build_trainer(cfg, trainer_arguments(cfg, folder, weights), inputs, folder)
        output = trainer.train(resume_from_checkpoint=resume_from)

        # --- save ---
        final = checkpoints.save_final(trainer.model, trainer.state.global_step)
        log.write(trainer.state)
        for name, path in (("final", final), ("best", ckpt_dir / "best"), ("training_log", log_path),
                           ("val_generations", folder / "val_generations"), ("trainer", folder / "trainer")):
            manifest.add_output(name, path)
        manifest.metrics.update(final_metrics(trainer.state.log_history, checkpoints.best, log))
        manifest.metrics.update({
            "train_runtime_s": output.metrics.get("train_runtime"),
            "dtype": policy["dtype"], "mixed_precision": "bf16" if precision["bf16"] else "no",
            "base_model": policy["base_model"], "policy_ckpt": str(ckpt),
            "reward_spec": str(spec_path) if spec_path else "built-in defaults",
            "n_train_prompts": len(train), "n_val_examples": len(val_rows),
        })
        print(f"done: final {final}; best step {manifest.metrics['best_step']}; "
              f"{manifest.metrics['train_tokens_per_s'] or 0:.1f} tokens/s, "
              f"{manifest.metrics['step_time_s_mean'] or 0:.1f} s/step")
        return manifest.metrics


def final_metrics(history: list[dict], best: dict | None, log) -> dict:
    """Manifest metrics from the log history: the last training log (TRL's names), means over the
    run, the first and last validation, and the best checkpoint's validation."""
    steps = [entry for entry in history if "reward" in entry]
    vals = [entry for entry in history if "val/exec_acc" in entry]
    last = steps[-1] if steps else {}
    mean = lambda key: (sum(e[key] for e in steps if e.get(key) is not None)  # noqa: E731
                        / max(1, sum(e.get(key) is not None for e in steps))) if steps else None
    best = best or {}
    return {
        "global_step": last.get("step"),
        **{f"final_{key.replace('/', '_')}": last.get(key) for key in
           ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "loss", "grad_norm")},
        "reward_mean_over_training": mean("reward"),
        "step_time_s_mean": mean("step_time"),
        "train_tokens": log.tokens,
        "train_tokens_per_s": log.tokens_per_s,
        "best_step": best.get("step"),
        **{f"best_val_{key}": best.get("metrics", {}).get(key) for key in ("exec_acc", "format_rate", "reward_mean")},
        **{f"{when}_val_{key}": (entry or {}).get(f"val/{key}") for when, entry in
           (("first", vals[0] if vals else None), ("last", vals[-1] if vals else None))
           for key in ("exec_acc", "format_rate", "reward_mean")},
    }
