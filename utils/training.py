"""Trainer plumbing shared by SFT (03) and the TRL-based RL scripts: arguments from the config,
policy checkpoints, generation-based validation, the JSON training log and a NaN/inf guard.

    from utils import training
    validation = training.ValidationCallback(val_rows, tokenizer, folder / "valid_samples", spec=spec,
                                             max_new_tokens=96, batch_size=8)
    checkpoints = training.CheckpointCallback(folder / "ckpt_sft", tokenizer, cfg, validation=validation)
    callbacks = [training.NonFiniteGuard(folder / "ckpt_sft", folder / "trainer"), validation, checkpoints,
                 training.JsonLogCallback(folder / "logs" / "training_log.json")]   # in this order
    trainer = SFTTrainer(model, SFTConfig(**training.training_arguments(cfg, folder / "trainer")),
                         ..., peft_config=training.lora_config(cfg), callbacks=callbacks)

Callbacks run in list order at each event, so the order above matters: the guard stops a broken
step before anything is validated or saved, the checkpoint callback reads the validation that
just ran, and the log is written last, with everything the others added.

Checkpoint folders (step_N, best, final) hold a LoRA adapter (adapter_config.json +
adapter_model.safetensors), the tokenizer, the resolved config as config.yaml and, when a
validation ran at that step, validation.json; utils.modeling.load_model(folder) loads them.
The trainer's own resumable checkpoints (optimizer, scheduler, RNG) live apart, in
<module>/trainer/checkpoint-N. Multi-process runs validate and save on the main process only
(DDP; DeepSpeed ZeRO-3 would need the adapter gathered first).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from utils import config as config_lib
from utils import modeling, runs
from utils.cli import JobFailed, UsageError
from utils.rewards import RewardSpec, load_spec, score

VALIDATION_FILE = "validation.json"  # in a checkpoint folder: the validation of that step
STEP_FOLDER = re.compile(r"step_(\d+)")


class NonFiniteLossError(JobFailed):
    """The training loss (or the weights) became NaN/inf; the message names the step and the
    last good checkpoint. A diverged run is a job that ran and failed: one line, exit 1."""


# --- config -> trainer arguments ---

def lora_config(cfg: dict):
    """peft LoraConfig from the config's lora section."""
    from peft import LoraConfig

    lora = cfg["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), bias=lora["bias"],
                      task_type=lora["task_type"], fan_in_fan_out=lora["fan_in_fan_out"])


def mixed_precision(cfg: dict, device: str | None = None) -> dict:
    """How the trainer computes, from the dtype policy (DESIGN.md), with fp32 master weights.

    Returns {"bf16": bool, "fp16": bool, "dtype": name, "note": why}: bf16 autocast where
    model.dtype resolves to bfloat16 (CUDA with bf16; CPUs with native bf16), fp16 on CUDA only.
    On a CPU without native bf16, "auto" resolves to float32: there bf16 matmuls fall back to a
    slow reference kernel (measured on an AVX2-only EPYC: a 512x576x1536 linear forward+backward
    took 1686 ms in bf16 against 225 ms in fp32).
    """
    device = device or modeling.default_device()
    dtype = modeling.resolve_dtype(cfg["model"]["dtype"], device)
    name = str(dtype).replace("torch.", "")
    if dtype == torch.bfloat16:
        return {"bf16": True, "fp16": False, "dtype": name, "note": "bf16 autocast, fp32 master weights"}
    if dtype == torch.float16 and device.startswith("cuda"):
        return {"bf16": False, "fp16": True, "dtype": name, "note": "fp16 autocast, fp32 master weights"}
    note = (f"model.dtype {cfg['model']['dtype']} resolves to {name} on {device}"
            + (" (fp16 autocast needs CUDA)" if dtype == torch.float16 else "")
            + ("; no native bf16 on this CPU" if device == "cpu" and cfg["model"]["dtype"] == "auto" else ""))
    return {"bf16": False, "fp16": False, "dtype": "float32", "note": note}


def sft_base_dtype(cfg: dict, device: str | None = None) -> torch.dtype:
    """The dtype 03 loads the base model in. Under LoRA the config's (model.dtype): the frozen base
    needs no float32 master copy (an 8B base takes 16 GB in bf16, not 32 per process), and peft
    keeps the trained adapter in float32. For full fine-tuning float32: those weights are the
    master weights the optimizer updates, and autocast computes in the config's dtype."""
    if not cfg["lora"]["enabled"]:
        return torch.float32
    return modeling.resolve_dtype(cfg["model"]["dtype"], device)  # None: this process's device


def training_arguments(cfg: dict, output_dir, eval_steps: int | None = None) -> dict:
    """Keyword arguments for a TrainingArguments subclass (SFTConfig, GRPOConfig...) from
    cfg["training"] (+ eval every `eval_steps` when given): the trainer's own checkpoints go to
    output_dir; NaN losses are logged as they are (the guard needs to see them)."""
    train = cfg["training"]
    if not 0 <= train["warmup_ratio"] < 1:
        raise config_lib.ConfigError(f"training.warmup_ratio must be in [0, 1), got {train['warmup_ratio']}")
    precision = mixed_precision(cfg)
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=train["learning_rate"],
        num_train_epochs=train["num_train_epochs"],
        max_steps=train["max_steps"],
        per_device_train_batch_size=train["per_device_train_batch_size"],
        per_device_eval_batch_size=train["per_device_eval_batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        warmup_steps=train["warmup_ratio"],  # transformers 5: a float in [0, 1) is a ratio of the steps
        weight_decay=train["weight_decay"],
        lr_scheduler_type=train["lr_scheduler_type"],
        max_grad_norm=train["max_grad_norm"],
        activation_checkpointing=train["gradient_checkpointing"],  # transformers 5's name for it
        optim=train["optim"],
        logging_strategy="steps",
        logging_steps=train["logging_steps"],
        logging_nan_inf_filter=False,  # the default hides a NaN loss behind the running mean
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=train["save_total_limit"],
        seed=train["seed"],
        # TensorBoard events come from JsonLogCallback's TrainingLog, the writer every trainer (PPO too)
        # shares; other integrations (wandb...) go through transformers
        report_to=[] if train["report_to"] in ("none", "", "tensorboard") else [train["report_to"]],
        bf16=precision["bf16"],
        fp16=precision["fp16"],
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 without a GPU unless told
    )
    if eval_steps:
        kwargs.update(eval_strategy="steps", eval_steps=eval_steps)
    return kwargs


def resolve_reward_spec(path: str | None, cfg: dict, run_id: str) -> tuple[RewardSpec, Path | None]:
    """--reward_spec, else outputs/<run_id>/02_rewards/reward_spec.yaml if present, else the
    built-in defaults (path None)."""
    if path is None:
        default = Path(cfg["paths"]["output_root"]) / run_id / "02_rewards" / "reward_spec.yaml"
        if not default.is_file():
            return RewardSpec(), None
        path = default
    return load_spec(path), Path(path)


def process_state():
    """This process's accelerate state. Every trainer creates it before it loads a model: under
    `accelerate launch` it joins the processes and gives each its own device (cuda:<local rank>);
    without a GPU cpu=True makes the processes join over gloo (as the trainers' use_cpu does),
    where without it each would take itself for the only, main, process.

    DeepSpeed ZeRO-3 is refused here, in one line: it shards the weights themselves, so the
    main-process-only validation (generate) would wait forever on the other ranks' all-gathers,
    and the main-process-only checkpoint would save empty adapter shards.

    Also makes TRL's fused LM head score only the labelled positions on a CPU
    (fused_head_scores_labels_only)."""
    from accelerate import PartialState

    fused_head_scores_labels_only()

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise UsageError("DeepSpeed ZeRO-3 is not supported by these trainers (validation and checkpoints run on "
                         "the main process, which ZeRO-3's sharded weights do not allow): launch with "
                         "configs/accelerate/deepspeed_zero2.yaml or multi_gpu_ddp.yaml")
    return PartialState(cpu=not torch.cuda.is_available())


def fused_head_scores_labels_only() -> None:
    """TRL's fused LM head (SFT, GRPO, RLOO, DPO) projects onto the vocabulary only the positions with a
    label on CUDA and XPU, but every position elsewhere, so that Neuron's compiler sees fixed tile shapes.
    A CPU compiles nothing, and there the projection of the prompt's positions, whose labels are masked,
    is about half of an SFT step's time (bench_train_step.py, AVX2 float32, a step of 4: 14.9 s every
    position, 7.9 s labelled only). Its kernels are
    still chosen by device (trl.kernels.chunked_logprob), so a CPU keeps its torch code path."""
    import trl.trainer.utils as fused_head

    choose = fused_head._use_triton  # TRL's choice of the compact (labelled positions only) projection
    if getattr(choose, "labels_only_on_cpu", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or choose(device)

    compact.labels_only_on_cpu = True
    fused_head._use_triton = compact


def prepare_folder(folder: Path, outputs, resume: str | None, last_checkpoint=None) -> str | None:
    """The checkpoint --resume continues from; a fresh run clears the previous run's outputs. Decided
    on the main process alone (two processes clearing one folder would race) and shared with all.

    Args:
        folder: the module folder.
        outputs: names in it that a fresh run removes (with "trainer", the trainer's checkpoints).
        resume: None (a fresh run), "last" (the newest resumable checkpoint), "auto" (the newest if
            there is one, else a fresh run: what 12_driver.py passes after a kill) or a checkpoint path.
        last_checkpoint: folder -> the newest resumable checkpoint or None (default: the
            trainer's newest complete trainer/checkpoint-N).
    """
    from accelerate.utils import broadcast_object_list

    found = [_prepare_folder(Path(folder), outputs, resume, last_checkpoint)
             if process_state().is_main_process else None]
    return broadcast_object_list(found)[0]


def _prepare_folder(folder: Path, outputs, resume: str | None, last_checkpoint) -> str | None:
    runs.lock_folder(folder)  # before anything is cleared: a live writer of this folder keeps it
    if resume is not None:
        find = last_checkpoint or (lambda f: last_trainer_checkpoint(f / "trainer"))
        found = find(folder) if resume in ("last", "auto") else (resume if Path(resume).is_dir() else None)
        if found is not None:
            print(f"resuming from {found}")
            return str(found)
        if resume != "auto":
            raise FileNotFoundError(f"--resume: no resumable checkpoint {'in ' + str(folder) if resume == 'last' else resume}"
                                    f"; run without --resume to start training")
        print(f"--resume auto: no checkpoint in {folder} to continue from; starting afresh")
    for name in ("trainer", *outputs):
        if (folder / name).exists():
            print(f"fresh run: removing the previous {folder / name} (use --resume to continue it)")
            shutil.rmtree(folder / name)
    return None


# --- checkpoints ---

def _portable(path: str) -> str:
    """A path inside the repository, relative to it (utils.modeling resolves it from anywhere)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(runs.REPO_ROOT)) if resolved.is_relative_to(runs.REPO_ROOT) else path


def save_policy(model, tokenizer, cfg: dict, folder, info: dict | None = None, write_extra=None) -> Path:
    """Save a checkpoint folder: the model (a peft model saves its active adapter only), the tokenizer,
    config.yaml (the resolved config) and, if given, `info` as validation.json. Written under a
    temporary name and renamed, so a crash never leaves half a checkpoint. write_extra(folder),
    if given, adds files before the rename (PPO: value_head.pt, trainer_state.pt)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a peft model holding several adapters (TRL's GRPO/RLOO add a frozen "ref" copy of the
        # SFT adapter as the KL reference) saves the trained, active one only
        from peft import PeftModel

        several = isinstance(model, PeftModel) and len(model.peft_config) > 1
        model.save_pretrained(str(tmp), **({"selected_adapters": [model.active_adapter]} if several else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        adapter_config = tmp / "adapter_config.json"
        if adapter_config.is_file():  # peft writes the base model's absolute path
            data = json.loads(adapter_config.read_text())
            if data.get("base_model_name_or_path"):
                data["base_model_name_or_path"] = _portable(data["base_model_name_or_path"])
                adapter_config.write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_lib.dump(cfg))
        if info is not None:
            runs.atomic_write_json(tmp / VALIDATION_FILE, info)
        if write_extra is not None:
            write_extra(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_merged(adapter_folder, dest, cfg: dict) -> Path:
    """Fold a LoRA checkpoint into its base: a plain float32 model folder (+ tokenizer, config.yaml)."""
    model = modeling.load_model(str(adapter_folder), dtype="float32", device="cpu")
    return save_policy(model, modeling.load_tokenizer(str(adapter_folder)), cfg, dest)


def restore_token_count(trainer, checkpoint) -> None:
    """Continue TRL's trained-token count (`num_tokens`) from a resumed checkpoint. TRL's SFT and DPO
    trainers keep it in trainer._total_train_tokens, which a checkpoint does not restore (GRPO and RLOO
    keep it in the trainer state, which it does): a resumed run would count its tokens from 0."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    counts = [entry["num_tokens"] for entry in history if "loss" in entry and "num_tokens" in entry]
    if counts:
        trainer._total_train_tokens = int(counts[-1])


def step_folders(ckpt_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every step_N checkpoint, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("step_*")
             if (m := STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def last_trainer_checkpoint(trainer_dir) -> str | None:
    """The newest complete checkpoint-N folder the trainer wrote (what --resume continues from). The
    trainer writes trainer_state.json last: a folder without it was cut short by a kill."""
    found = [(int(m.group(1)), p) for p in Path(trainer_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def prune_step_folders(ckpt_dir, keep: int | None) -> None:
    """Keep the newest `keep` step_N folders (None or 0: all)."""
    for _, old in step_folders(ckpt_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def rank(metrics: dict) -> tuple:
    """Higher is better: val exec_acc, ties broken by reward_mean; without generation metrics
    (--skip_validation) the lowest val loss."""
    if metrics.get("exec_acc") is not None:
        return (1, metrics["exec_acc"], metrics.get("reward_mean") or 0.0)
    return (0, -metrics["eval_loss"])


class CheckpointCallback(TrainerCallback):
    """ckpt_dir/step_N at every trainer save (keeping the newest save_total_limit), ckpt_dir/best
    when a validation beats the best so far, and ckpt_dir/final through save_final().

    Args:
        ckpt_dir: e.g. outputs/run_001/03_sft/ckpt_sft.
        tokenizer, cfg: saved with every checkpoint.
        save_total_limit: step_N folders kept (None: all).
        validation: the ValidationCallback whose results pick the best (listed before this
            callback); None: best by the lowest eval_loss.
        resume: keep the best so far (read from ckpt_dir/best/validation.json).
    """

    def __init__(self, ckpt_dir, tokenizer, cfg: dict, *, save_total_limit: int | None = None,
                 validation: "ValidationCallback | None" = None, resume: bool = False):
        self.ckpt_dir = Path(ckpt_dir)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.save_total_limit = save_total_limit
        self.validation = validation
        self.best: dict | None = None  # {"step", "metrics", "path"}
        best_file = self.ckpt_dir / "best" / VALIDATION_FILE
        if resume and best_file.is_file():
            self.best = {**runs.read_json(best_file), "path": str(self.ckpt_dir / "best")}

    def _info(self, step: int) -> dict | None:
        latest = self.validation.latest if self.validation else None
        return latest if latest and latest["step"] == step else None

    def _consider(self, model, step: int, metrics: dict) -> None:
        if self.best is None or rank(metrics) > rank(self.best["metrics"]):
            path = save_policy(model, self.tokenizer, self.cfg, self.ckpt_dir / "best",
                               {"step": step, "metrics": metrics})
            self.best = {"step": step, "metrics": metrics, "path": str(path)}
            print(f"step {step}: new best checkpoint -> {path}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        info = self._info(state.global_step)  # a validation on its own schedule just ran
        if info and state.is_world_process_zero:
            self._consider(model, info["step"], info["metrics"])

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        info = self._info(state.global_step)
        if info:
            self._consider(model, info["step"], info["metrics"])
        elif self.validation is None and metrics and "eval_loss" in metrics:
            self._consider(model, state.global_step, {"eval_loss": metrics["eval_loss"]})

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        save_policy(model, self.tokenizer, self.cfg, self.ckpt_dir / f"step_{state.global_step}",
                    self._info(state.global_step))
        prune_step_folders(self.ckpt_dir, self.save_total_limit)

    def save_final(self, model, step: int) -> Path:
        """ckpt_dir/final (and best too, when no validation ever chose one)."""
        final = save_policy(model, self.tokenizer, self.cfg, self.ckpt_dir / "final", self._info(step))
        if self.best is None:
            shutil.copytree(final, self.ckpt_dir / "best", dirs_exist_ok=True)
            self.best = {"step": step, "metrics": {}, "path": str(self.ckpt_dir / "best")}
        return final


# --- validation ---

class ValidationCallback(TrainerCallback):
    """Greedy generation on validation examples, scored with utils.rewards, at each trainer
    evaluation (every eval_steps and at the end, with eval_strategy="steps") or, with `every`,
    on its own schedule (every `every` steps and at the last step) for trainers that evaluate
    nothing themselves.

    Each run writes samples_dir/step_N.json ({"step", "metrics", "samples": [{id, completion,
    num_tokens, target, reward components, category, ...}]}) or, with samples_format "jsonl"
    (the RL scripts' val_generations/), samples_dir/step_N.jsonl (one sample per line, with
    its "step"), appends
    {"step", "eval_loss", "val/exec_acc", "val/format_rate", "val/reward_mean", ...} to the
    trainer's log history, and keeps {"step", "metrics"} in `latest` and `results`.

    Args:
        examples: processed examples (prompt + the fields utils.rewards.score reads).
        tokenizer: the policy's tokenizer.
        samples_dir: where step_N.json files go.
        spec: reward weights and tolerances.
        max_new_tokens, batch_size: generation budget and batch.
        every: own schedule in steps (None: follow the trainer's evaluations).
        generate_fn: utils.generation.generate or one with its signature.
        samples_format: "json" (SFT's valid_samples/step_N.json) or "jsonl" (RL's val_generations/).
    """

    def __init__(self, examples: list[dict], tokenizer, samples_dir, *, spec: RewardSpec = RewardSpec(),
                 max_new_tokens: int = 96, batch_size: int = 8, every: int | None = None, generate_fn=None,
                 samples_format: str = "json"):
        if samples_format not in ("json", "jsonl"):
            raise ValueError(f"samples_format must be 'json' or 'jsonl', got {samples_format!r}")
        self.samples_format = samples_format
        if generate_fn is None:
            from utils.generation import generate as generate_fn
        self.examples, self.tokenizer, self.samples_dir = list(examples), tokenizer, Path(samples_dir)
        self.spec, self.max_new_tokens, self.batch_size = spec, max_new_tokens, batch_size
        self.every, self.generate_fn = every, generate_fn
        self.results: list[dict] = []
        self.latest: dict | None = None

    def validate(self, model, step: int, extra: dict | None = None) -> dict:
        """Generate, score and record at `step`; returns the metrics (utils.metrics names)."""
        from utils.metrics import aggregate

        was_training = model.training
        model.eval()  # dropout off; the peft model keeps its adapters on
        started = time.perf_counter()
        try:
            outputs = self.generate_fn(model, self.tokenizer, [e["prompt"] for e in self.examples],
                                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                       do_sample=False, desc=f"validation step {step}",
                                       checkpoint=f"the policy at step {step}")
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - started
        results = [score(o["completions"][0], e, self.spec) for o, e in zip(outputs, self.examples)]
        tokens = sum(o["num_tokens"][0] for o in outputs)
        metrics = {**(extra or {}), **aggregate(results, tokens, elapsed, n_resamples=0)}
        samples = [{"id": e.get("id"), "completion": o["completions"][0], "num_tokens": o["num_tokens"][0],
                    "target": e["completion"][0]["content"] if e.get("completion") else None, **r.to_dict()}
                   for o, e, r in zip(outputs, self.examples, results)]
        if self.samples_format == "jsonl":
            runs.atomic_write_jsonl(self.samples_dir / f"step_{step}.jsonl", [{"step": step, **s} for s in samples])
        else:
            runs.atomic_write_json(self.samples_dir / f"step_{step}.json",
                                   {"step": step, "metrics": metrics, "samples": samples})
        self.latest = {"step": step, "metrics": metrics}
        self.results.append(self.latest)
        print(f"step {step} validation: format_rate {metrics['format_rate']:.3f}  exec_acc "
              f"{metrics['exec_acc']:.3f}  reward_mean {metrics['reward_mean']:.3f}  "
              f"({len(results)} examples, {elapsed:.1f}s)")
        return metrics

    def _run(self, model, state, extra=None) -> None:
        if not state.is_world_process_zero or not self.examples:
            return
        if self.latest and self.latest["step"] == state.global_step:
            return  # already validated this step
        metrics = self.validate(model, state.global_step, extra)
        entry = {f"val/{k}": v for k, v in metrics.items() if k != "eval_loss" and v is not None}
        if "eval_loss" in metrics:
            entry = {"eval_loss": metrics["eval_loss"], **entry}
        state.log_history.append({**entry, "epoch": state.epoch, "step": state.global_step})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and (state.global_step % self.every == 0 or state.global_step >= state.max_steps):
            self._run(model, state)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.every:
            loss = (metrics or {}).get("eval_loss")
            self._run(model, state, {"eval_loss": loss} if loss is not None else None)


# --- logs ---

def _finite_or_none(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def peak_rss_gb(reset: bool = True) -> float | None:
    """This process's peak resident memory in GB since the previous call, or since it started.

    Linux keeps the peak (VmHWM in /proc/self/status); writing "5" to /proc/self/clear_refs
    restarts it, so each training log entry shows the peak of its own steps. None where /proc
    is not there (then nothing is logged, rather than a wrong number).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")
    except (OSError, StopIteration, ValueError):
        return None
    return round(kilobytes / 2**20, 3)


def peak_gpu_gb(reset: bool = True) -> float | None:
    """Peak GPU memory allocated by this process's tensors (GB) since the previous call; None without CUDA.
    Beside peak_rss_gb, which counts host memory only."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak / 2**30, 3)


def synced_clock() -> float:
    """time.perf_counter() once the GPU has finished its queued work: CUDA kernels run asynchronously,
    so an unsynchronized clock would time their launch rather than their run."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class TrainingLog:
    """The one training-log writer of every trainer (SFT, PPO, GRPO, RLOO, DPO): logs/training_log.json
    ({"log_history": [...]}, NaN/inf as null, rewritten atomically) and, with report_to tensorboard,
    TensorBoard events beside it (`tensorboard --logdir outputs/<run_id>`), one scalar per
    numeric key of each entry at its step. Each new training entry (one with a "loss") gets
    `peak_rss_gb`: the process's peak resident memory since the previous one (peak_rss_gb()), and
    on a GPU `peak_gpu_gb` (peak_gpu_gb()).

    Args:
        path: the JSON file (its folder receives the event files).
        report_to: the config's training.report_to; "tensorboard" writes events.
        logged: entries of the history already in the event files (a resumed run's restored
            history), so they are not written twice.
    """

    def __init__(self, path, report_to: str = "none", logged: int = 0):
        self.path = Path(path)
        self.logged = logged
        self.events = None
        # the largest peak_rss_gb / peak_gpu_gb in the log, a resumed run's restored entries included,
        # so the manifest of a resumed run reports the peak of the whole training (None if never logged)
        self.peak_rss_gb: float | None = None
        self.peak_gpu_gb: float | None = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise config_lib.ConfigError("training.report_to tensorboard needs the tensorboard package: "
                                             "pip install -r requirements.txt (or --training.report_to none)") from error
            self.events = SummaryWriter(str(self.path.parent))

    def write(self, history: list[dict]) -> None:
        for entry in history[self.logged:]:  # training entries new since the last write
            if "loss" in entry and "peak_rss_gb" not in entry:
                entry["peak_rss_gb"] = peak_rss_gb()
                if (gpu := peak_gpu_gb()) is not None:
                    entry["peak_gpu_gb"] = gpu
        for key in ("peak_rss_gb", "peak_gpu_gb"):
            peaks = [entry[key] for entry in history if entry.get(key) is not None]
            setattr(self, key, max(peaks) if peaks else None)
        history = [{k: _finite_or_none(v) for k, v in entry.items()} for entry in history]
        runs.atomic_write_json(self.path, {"log_history": history})
        if self.events is not None:
            for entry in history[self.logged:]:
                for name, value in entry.items():
                    if name not in ("step", "epoch") and isinstance(value, (int, float)):
                        self.events.add_scalar(name, value, entry.get("step", 0))
            self.events.flush()
        self.logged = len(history)


class JsonLogCallback(TrainerCallback):
    """Write the trainer's log history through TrainingLog after every log event, with
    `train/tokens_per_s` added to each training log: tokens (TRL's cumulative `num_tokens`)
    over the time spent in optimizer steps since the previous log (validation, evaluation and
    saving excluded). The file is {"log_history": [{"step", "loss", "grad_norm",
    "learning_rate", "epoch", "num_tokens", ..., "train/tokens_per_s"}, {"step", "eval_loss",
    "val/exec_acc", ...}]}; on resume the trainer restores the history up to its checkpoint.
    Also forces a log at the last step, so the curve ends where training does. List it last:
    it writes what the callbacks before it added.
    """

    def __init__(self, path, report_to: str = "none", tokens_key: str = "num_tokens"):
        self.path = Path(path)
        self.report_to = report_to
        self.log: TrainingLog | None = None  # opened at train begin, when a resumed history is known
        self.tokens_key = tokens_key
        self.tokens = 0                # tokens trained in this process (TRL counts per process)
        self.train_time_s = 0.0        # time in optimizer steps in this process
        self._mark = (0, 0.0)          # (tokens, train time) at the previous training log
        self._step_started = None
        self._written = -1

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.log is None:
            self.log = TrainingLog(self.path, self.report_to, logged=len(state.log_history))

    @property
    def peak_rss_gb(self) -> float | None:
        """The largest per-log peak resident memory (GB) in the run's log (restored entries included)."""
        return self.log.peak_rss_gb if self.log else None

    @property
    def peak_gpu_gb(self) -> float | None:
        """The largest per-log peak GPU memory (GB) in the run's log; None without CUDA."""
        return self.log.peak_gpu_gb if self.log else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_time_s if self.train_time_s > 0 and self.tokens else None

    def write(self, state) -> None:
        if self.log is None:
            self.log = TrainingLog(self.path, self.report_to, logged=len(state.log_history))
        self.log.write(state.log_history)
        self._written = len(state.log_history)

    def _write_if_changed(self, state) -> None:
        if state.is_world_process_zero and len(state.log_history) != self._written:
            self.write(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = synced_clock()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self.train_time_s += synced_clock() - self._step_started
            self._step_started = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        self._write_if_changed(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and self.tokens_key in logs:
            self.tokens = int(logs[self.tokens_key])
            tokens, seconds = self.tokens - self._mark[0], self.train_time_s - self._mark[1]
            if seconds > 0 and state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["train/tokens_per_s"] = round(tokens / seconds, 2)
            self._mark = (self.tokens, self.train_time_s)
        self._write_if_changed(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._write_if_changed(state)

    def on_save(self, args, state, control, **kwargs):
        self._write_if_changed(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write_if_changed(state)


# --- NaN/inf guard ---

class NonFiniteGuard(TrainerCallback):
    """Stop training with NonFiniteLossError when the loss or grad norm is logged as NaN/inf, or
    when an update leaves NaN/inf in the trainable weights (checked every step, before anything
    is validated or saved, so the broken state is never written). List it first.

    Args:
        ckpt_dir: policy checkpoints (step_N), named in the error as the last good one.
        trainer_dir: the trainer's checkpoint-N folders (what --resume continues from).
    """

    def __init__(self, ckpt_dir=None, trainer_dir=None):
        self.ckpt_dir, self.trainer_dir = ckpt_dir, trainer_dir

    def _fail(self, state, what: str):
        saved = step_folders(self.ckpt_dir) if self.ckpt_dir else []
        good = f"{saved[-1][1]}" if saved else "none (no checkpoint was saved before this step)"
        resume = last_trainer_checkpoint(self.trainer_dir) if self.trainer_dir else None
        raise NonFiniteLossError(
            f"training stopped at step {state.global_step}: {what}. Nothing was saved from this state. "
            f"Last good checkpoint: {good}" + (f" (trainer state: {resume}, continue with --resume)" if resume else "")
            + ". Lower the learning rate (--training.learning_rate) or check the data for broken examples.")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        with torch.no_grad():
            trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
            if not trainable:
                return
            # one host sync per step (a GPU stalls at each read), not one per parameter
            flags = torch.stack([torch.isfinite(param).all() for _, param in trainable])
            if bool(flags.all()):
                return
            name = trainable[int((~flags).nonzero()[0])][0]
            self._fail(state, f"the update left NaN/inf in the trainable weight {name} "
                              f"(the loss or its gradient was not finite)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._fail(state, f"{key} is {value}")
