"""PPO from the SFT checkpoint, with our own implementation (utils/ppo.py).

    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft                 # its ckpt_sft/best
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --max_steps 50 --algorithm.kl_coef 0.1
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --resume        # from the last step_N
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --quick_test    # 8 prompts, 2 steps
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml 05_train_ppo.py --quick_test  # 2 CPU procs

Each step samples one completion for each of algorithm.rollout_batch_size training prompts (over
all processes), scores it with the reward spec and takes PPO updates (utils/ppo.py explains the
algorithm). The SFT adapter is merged into the base weights at load time and a fresh LoRA adapter
is trained on top: the reference policy is the same network with that adapter switched off.

Writes outputs/<run_id>/05_ppo/:
  reference_model/         the SFT policy merged into the base: the KL reference, and the base
                           model every PPO adapter names (so utils.modeling.load_model loads them)
  ckpt_ppo/{step_N,best,final}/  LoRA adapter + value_head.pt + tokenizer + config.yaml
                           (+ validation.json where a validation ran; step_N also trainer_state.pt
                           for --resume); best by val exec_acc, ties by val reward_mean
  logs/training_log.json   {"log_history": [...]}: one entry per step (TRL's names + ppo/*, listed
                           in utils.ppo.PPOTrainer.step) and one per validation (val/*)
  val_generations/step_N.jsonl   greedy validation generations, scored
  manifest.json
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import sys
from pathlib import Path

from utils import config as config_lib
from utils import runs, training
from utils.training import _finite_or_none

MODULE = "05_ppo"
METHOD = "ppo"
# --quick_test: a smoke run (explicit flags win)
QUICK_TEST = {"training.max_steps": 2, "algorithm.rollout_batch_size": 4, "generation.max_new_tokens": 48,
              "validation.max_new_tokens": 48, "validation.num_samples": 4, "validation.eval_steps": 2,
              "training.save_steps": 1}
QUICK_TEST_TRAIN_PROMPTS = 8


class PPOInputError(RuntimeError):
    """A missing or unusable input; the message names it and the fix."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser, algo=METHOD)
    parser.add_argument("--policy_ckpt", default=None,
                        help="the SFT start: an SFT run folder (uses its ckpt_sft/best) or a checkpoint "
                             "folder (default: outputs/<run_id>/03_sft)")
    parser.add_argument("--train_jsonl", default=None, help="(default: <paths.data_dir>/train.jsonl)")
    parser.add_argument("--val_jsonl", default=None, help="(default: <paths.data_dir>/val.jsonl)")
    parser.add_argument("--reward_spec", default=None,
                        help="reward_spec.yaml (default: outputs/<run_id>/02_rewards/reward_spec.yaml if "
                             "present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {QUICK_TEST_TRAIN_PROMPTS} prompts, {QUICK_TEST['validation.num_samples']} "
                             f"val examples, 2 steps of 4 prompts, {QUICK_TEST['generation.max_new_tokens']} new tokens")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="STEP_DIR",
                        help="continue a run: from the last ckpt_ppo/step_N of the output folder, or the "
                             "given step folder (adapter, value head, optimizer, KL controller, step, RNG)")
    return parser.parse_known_args(argv)


# --- helpers ---
def resolve_config(args, extra_tokens) -> dict:
    """Model YAML < ppo.yaml < --quick_test values < command line."""
    set_by_shortcut = {config_lib.SHORTCUTS[name] for name in config_lib.SHORTCUTS
                       if getattr(args, name, None) is not None}
    quick = [token for key, value in QUICK_TEST.items() if key not in set_by_shortcut
             for token in (f"--{key}", str(value))] if args.quick_test else []
    return config_lib.from_args(args, [*quick, *extra_tokens])


def resolve_policy(policy_ckpt: str | None, cfg: dict, run_id: str) -> Path:
    folder = Path(policy_ckpt) if policy_ckpt else Path(cfg["paths"]["output_root"]) / run_id / "03_sft"
    if (folder / "ckpt_sft" / "best").is_dir():
        folder = folder / "ckpt_sft" / "best"
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return folder
    raise PPOInputError(f"--policy_ckpt {folder}: no checkpoint there (expected adapter_config.json, config.json "
                        f"or ckpt_sft/best/). Train one with python 03_sft_train.py, or pass a checkpoint folder "
                        f"such as outputs/run_001/03_sft/ckpt_sft/final")


def read_split(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise PPOInputError(f"{what} {path} not found: run python 01_prepare_dataset.py first "
                            f"(or pass --{what} FILE)")
    return runs.read_jsonl(path)


def find_resume(resume: str, ckpt_root: Path) -> Path:
    """The step folder to resume from: the given one, or the last ckpt_ppo/step_N."""
    if resume != "last":
        folder = Path(resume)
    else:
        steps = [folder for _, folder in training.step_folders(ckpt_root) if (folder / "trainer_state.pt").is_file()]
        if not steps:
            raise PPOInputError(f"--resume: no ckpt_ppo/step_N with trainer_state.pt under {ckpt_root}; "
                                f"start without --resume, or pass the step folder: --resume PATH")
        folder = steps[-1]
    if not (folder / "trainer_state.pt").is_file():
        raise PPOInputError(f"--resume {folder}: no trainer_state.pt there (only ckpt_ppo/step_N folders "
                            f"can be resumed; best/ and final/ hold no optimizer state)")
    return folder


def prompt_batch(examples: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The step's batch_size prompts, in epochs of seeded shuffles: step N always gets the same
    prompts, so a resumed run continues the uninterrupted run's data order."""
    n, batch = len(examples), []
    for index in range((step - 1) * batch_size, step * batch_size):
        epoch, position = divmod(index, n)
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        batch.append(examples[order[position]])
    return batch


class TrainingLog:
    """logs/training_log.json as utils.training.JsonLogCallback writes it ({"log_history": [...]},
    NaN as null, rewritten atomically) and, with report_to tensorboard, TensorBoard events."""

    def __init__(self, folder: Path, report_to: str, resume_step: int = 0):
        self.path = folder / "logs" / "training_log.json"
        self.history = []
        if resume_step and self.path.is_file():  # keep the history up to the resumed step
            logged = runs.read_json(self.path)["log_history"]
            self.history = [entry for entry in logged if entry.get("step", 0) <= resume_step]
        self.writer = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise PPOInputError("training.report_to tensorboard needs the tensorboard package: "
                                    "pip install tensorboard (or --training.report_to none)") from error
            self.writer = SummaryWriter(str(folder / "logs"))

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({**{k: _finite_or_none(v) for k, v in metrics.items()}, "step": step})
        runs.atomic_write_json(self.path, {"log_history": self.history})
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()


# --- main ---
def main(args, extra_tokens=()) -> int:
    try:
        cfg = resolve_config(args, extra_tokens)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch
    from accelerate import Accelerator

    from utils.modeling import load_model, load_tokenizer, resolve_dtype
    from utils.ppo import PPOHyperparams, PPOTrainer, build_policy

    # no GPU: say so, or processes started by torchrun (accelerate's multi-process launcher, see
    # configs/accelerate/cpu_2proc.yaml) would each run alone instead of joining a gloo group
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    is_main = accelerator.is_main_process
    hp = PPOHyperparams.from_config(cfg)
    seed = cfg["training"]["seed"]
    folder = runs.module_dir(args.run_id, MODULE, args.output_dir, cfg["paths"]["output_root"])
    ckpt_root, reference_dir = folder / f"ckpt_{METHOD}", folder / "reference_model"
    runs.seed_everything(seed)
    manifest = runs.Manifest(folder, MODULE, vars(args), cfg, seed) if is_main else contextlib.nullcontext()
    try:
        with manifest:
            # --- data ---
            data_dir = Path(cfg["paths"]["data_dir"])
            train_path = Path(args.train_jsonl) if args.train_jsonl else data_dir / "train.jsonl"
            val_path = Path(args.val_jsonl) if args.val_jsonl else data_dir / "val.jsonl"
            train = read_split(train_path, "train_jsonl")[:QUICK_TEST_TRAIN_PROMPTS if args.quick_test else None]
            val = read_split(val_path, "val_jsonl")[:cfg["validation"]["num_samples"]]
            spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
            policy_dir = resolve_policy(args.policy_ckpt, cfg, args.run_id)

            # --- model ---
            resume_dir = find_resume(args.resume, ckpt_root) if args.resume else None
            device = str(accelerator.device)
            dtype = resolve_dtype(cfg["model"]["dtype"], device)
            if resume_dir is None:
                base = load_model(str(policy_dir), dtype=dtype, device=device)  # an SFT adapter is merged here
                if is_main:
                    training.save_policy(base, load_tokenizer(str(policy_dir)), cfg, reference_dir)
            else:  # the reference the run started with, whatever --policy_ckpt says now
                base = load_model(str(reference_dir), dtype=dtype, device=device)
            dtype = base.dtype  # what the weights hold: float32 when an SFT adapter was merged in
            tokenizer = load_tokenizer(str(policy_dir))
            model = build_policy(base, cfg, adapter_dir=resume_dir)
            # every PPO adapter sits on the merged SFT model: name it as the base to load from
            model.policy.peft_config["default"].base_model_name_or_path = str(reference_dir)
            trainer = PPOTrainer(cfg, model, tokenizer, spec, accelerator)
            start_step, best = 0, None
            if resume_dir is not None:
                extra = trainer.load_state(resume_dir)
                start_step, best = extra["step"], extra.get("best")
            log = TrainingLog(folder, cfg["training"]["report_to"], start_step) if is_main else None
            validation = training.ValidationCallback(
                val, tokenizer, folder / "val_generations", spec=spec, samples_format="jsonl",
                max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"])
            if is_main:
                manifest.add_input("train", train_path)
                manifest.add_input("val", val_path)
                manifest.add_input("policy_ckpt", policy_dir)
                if spec_path is not None:
                    manifest.add_input("reward_spec", spec_path)
                if resume_dir is not None:
                    manifest.add_input("resume", resume_dir)
                manifest.metrics.update(dtype=str(dtype).replace("torch.", ""),
                                        num_processes=accelerator.num_processes, resumed_from_step=start_step)
                manifest.write()
                print(f"PPO: {len(train)} train prompts, {len(val)} val, steps {start_step + 1}..{hp.max_steps}, "
                      f"{hp.rollout_batch_size} prompts/step over {accelerator.num_processes} process(es), "
                      f"dtype {str(dtype).replace('torch.', '')}, policy {policy_dir}", flush=True)

            # --- train ---
            step_times, token_rates, val_metrics = [], [], {}
            eval_steps, save_steps = cfg["validation"]["eval_steps"], cfg["training"]["save_steps"]
            local = trainer.local_batch_size
            for step in range(start_step + 1, hp.max_steps + 1):
                batch = prompt_batch(train, step, hp.rollout_batch_size, seed)
                examples = batch[accelerator.process_index * local:(accelerator.process_index + 1) * local]
                metrics = trainer.step(examples, step)
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise FloatingPointError(f"step {step}: non-finite loss/grad_norm ({metrics['loss']}, "
                                             f"{metrics['grad_norm']}); lower --learning_rate or check the SFT "
                                             f"checkpoint")
                step_times.append(metrics["time/step_s"])
                token_rates.append(metrics["train/tokens_per_s"])
                last = step == hp.max_steps
                if is_main:
                    log.log(step, metrics)
                    print(f"step {step}/{hp.max_steps}: reward {metrics['reward']:.3f} kl {metrics['kl']:.3f} "
                          f"value_loss {metrics['ppo/value_loss']:.4f} clipfrac {metrics['ppo/clipfrac']:.3f} "
                          f"{metrics['time/step_s']:.1f}s {metrics['train/tokens_per_s']:.1f} tok/s", flush=True)
                    info = None
                    if step % eval_steps == 0 or last:
                        val_metrics = validation.validate(trainer.unwrapped.policy, step)
                        log.log(step, {f"val/{k}": v for k, v in val_metrics.items() if v is not None})
                        info = {"step": step, "metrics": val_metrics}
                        # best by val exec_acc, ties by reward_mean (as 03's best)
                        rank = [val_metrics["exec_acc"], val_metrics["reward_mean"]]
                        if best is None or rank > best["rank"]:
                            best = {"step": step, "rank": rank,
                                    "metrics": {k: val_metrics[k] for k in ("exec_acc", "format_rate", "reward_mean")}}
                            trainer.save(ckpt_root / "best", info, resumable=False)
                    if step % save_steps == 0 or last:
                        trainer.save(ckpt_root / f"step_{step}", info, extra={"step": step, "best": best})
                        keep = cfg["training"]["save_total_limit"]
                        for _, old in training.step_folders(ckpt_root)[:-keep] if keep else []:
                            shutil.rmtree(old, ignore_errors=True)
                accelerator.wait_for_everyone()  # the others wait while the main process validates/saves

            if is_main:
                trainer.save(ckpt_root / "final", validation.latest, resumable=False)
                for name in ("final", "best"):
                    if (ckpt_root / name).is_dir():
                        manifest.add_output(f"ckpt_{name}", ckpt_root / name)
                manifest.add_output("reference_model", reference_dir)
                manifest.add_output("training_log", log.path)
                manifest.add_output("val_generations", folder / "val_generations")
                best = best or {}
                manifest.metrics.update(
                    global_step=hp.max_steps, best_step=best.get("step"),
                    **{f"best_val_{k}": v for k, v in best.get("metrics", {}).items()},
                    **{f"final_val_{k}": val_metrics.get(k) for k in ("exec_acc", "format_rate", "reward_mean")},
                    mean_step_s=sum(step_times) / len(step_times) if step_times else None,
                    train_tokens_per_s=sum(token_rates) / len(token_rates) if token_rates else None,
                    final_kl_coef=trainer.kl_controller.value, reward_spec=str(spec_path or "built-in defaults"))
            accelerator.wait_for_everyone()
    except PPOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(*parse_args()))
