"""PPO from the SFT checkpoint, with our own implementation (utils/ppo.py).

    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft                 # its ckpt_sft/best
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --max_steps 50 --algorithm.kl_coef 0.1
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --resume        # from the last step_N
    python 05_train_ppo.py --policy_ckpt outputs/run_001/03_sft --quick_test    # 8 prompts, 2 steps
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml 05_train_ppo.py --quick_test  # 2 CPU procs

Each step samples one completion for each of algorithm.rollout_batch_size training prompts (over
all processes), scores it with the reward spec and takes PPO updates (utils/ppo.py explains the
algorithm). The SFT adapter itself is trained; the reference policy is a frozen copy of it over
the same base weights (utils.rl.load_policy), as in 06, 07 and 09.

Writes outputs/<run_id>/05_ppo/:
  ckpt_ppo/{step_N,best,final}/  LoRA adapter + value_head.pt + tokenizer + config.yaml
                           (+ validation.json where a validation ran; step_N also trainer_state.pt
                           for --resume); best by val exec_acc, ties by val reward_mean
  logs/training_log.json   {"log_history": [...]}: one entry per step (TRL's names + ppo/*, listed
                           in utils.ppo.PPOTrainer.step) and one per validation (val/*); TensorBoard
                           events beside it (training.report_to tensorboard)
  val_generations/step_N.jsonl   greedy validation generations, scored
  manifest.json
"""
from __future__ import annotations

import math
from pathlib import Path

from utils import cli, rl, runs, training
from utils import config as config_lib

MODULE = "05_ppo"
METHOD = "ppo"
# --quick_test: a smoke run (explicit flags win)
QUICK_TEST = {"training.max_steps": 2, "algorithm.rollout_batch_size": 4, "generation.max_new_tokens": 48,
              "validation.max_new_tokens": 48, "validation.num_samples": 4, "validation.eval_steps": 2,
              "training.save_steps": 1}
QUICK_TEST_TRAIN_PROMPTS = 8


def parse_args(argv=None):
    quick = f"{QUICK_TEST_TRAIN_PROMPTS} train prompts, 2 steps of 4 prompts"
    return rl.argument_parser(__doc__, METHOD, QUICK_TEST, quick).parse_known_args(argv)


# --- helpers ---
def last_step_checkpoint(folder: Path) -> Path | None:
    """The newest ckpt_ppo/step_N that --resume can continue from (it holds trainer_state.pt)."""
    steps = [step for _, step in training.step_folders(folder / f"ckpt_{METHOD}")
             if (step / "trainer_state.pt").is_file()]
    return steps[-1] if steps else None


def prompt_batch(examples: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The step's batch_size prompts, in epochs of seeded shuffles: step N always gets the same
    prompts, so a resumed run continues the uninterrupted run's data order."""
    import random

    n, batch = len(examples), []
    for index in range((step - 1) * batch_size, step * batch_size):
        epoch, position = divmod(index, n)
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        batch.append(examples[order[position]])
    return batch


# --- main ---
def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens, QUICK_TEST)
    import torch
    from accelerate import Accelerator, DistributedType

    from utils.ppo import PPOHyperparams, PPOTrainer, build_policy

    # no GPU: say so, or processes started by torchrun (accelerate's multi-process launcher, see
    # configs/accelerate/cpu_2proc.yaml) would each run alone instead of joining a gloo group
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine wants a dataloader to size its micro-batches and steps the optimizer
        # inside every backward: PPO's own minibatch loop (several clipped updates per rollout) fits neither
        raise cli.UsageError("05_train_ppo.py runs in one process or under plain data parallelism, not DeepSpeed: "
                             "accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml 05_train_ppo.py ...")
    is_main = accelerator.is_main_process
    hp = PPOHyperparams.from_config(cfg)
    seed = cfg["training"]["seed"]
    folder = rl.output_folder(args, cfg, MODULE)
    ckpt_root = folder / f"ckpt_{METHOD}"
    runs.seed_everything(seed)
    resume_dir = rl.prepare_run_folder(folder, METHOD, args.resume, last_step_checkpoint)
    try:
        with runs.Manifest(folder, MODULE, args, cfg, seed, main_process=is_main) as manifest:
            # --- data ---
            data_dir = Path(cfg["paths"]["data_dir"])
            train_path = Path(args.train_jsonl or data_dir / "train.jsonl")
            val_path = Path(args.val_jsonl or data_dir / "val.jsonl")
            train = rl.read_split(train_path, "--train_jsonl")[:QUICK_TEST_TRAIN_PROMPTS if args.quick_test else None]
            val = rl.read_split(val_path, "--val_jsonl")[:cfg["validation"]["num_samples"]]
            spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)

            # --- model ---
            ckpt = rl.start_checkpoint(args, cfg)
            policy, tokenizer, start = rl.load_policy(ckpt, cfg)
            model = build_policy(policy, cfg, resume_dir=resume_dir)
            trainer = PPOTrainer(cfg, model, tokenizer, spec, accelerator)
            start_step, best = 0, None
            if resume_dir is not None:
                extra = trainer.load_state(resume_dir)
                start_step, best = extra["step"], extra.get("best")
            log_path = folder / "logs" / "training_log.json"
            history = ([e for e in runs.read_json(log_path)["log_history"] if e.get("step", 0) <= start_step]
                       if start_step and log_path.is_file() else [])
            log = training.TrainingLog(log_path, cfg["training"]["report_to"], logged=len(history)) if is_main else None
            validation = training.ValidationCallback(
                val, tokenizer, folder / "val_generations", spec=spec, samples_format="jsonl",
                max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"])
            for name, path in (("train", train_path), ("val", val_path), ("policy_ckpt", ckpt),
                               ("reward_spec", spec_path), ("resume", resume_dir)):
                if path is not None and Path(path).exists():
                    manifest.add_input(name, path)
            manifest.metrics.update(dtype=start["dtype"], base_model=start["base_model"], policy_ckpt=str(ckpt),
                                    num_processes=accelerator.num_processes, resumed_from_step=start_step)
            manifest.write()
            if is_main:
                print(f"PPO: {len(train)} train prompts, {len(val)} val, steps {start_step + 1}..{hp.max_steps}, "
                      f"{hp.rollout_batch_size} prompts/step over {accelerator.num_processes} process(es), "
                      f"{start['dtype']} base, fp32 LoRA, policy {ckpt}", flush=True)

            # --- train ---
            step_times, token_rates, val_metrics = [], [], {}
            eval_steps, save_steps = cfg["validation"]["eval_steps"], cfg["training"]["save_steps"]
            local = trainer.local_batch_size
            for step in range(start_step + 1, hp.max_steps + 1):
                batch = prompt_batch(train, step, hp.rollout_batch_size, seed)
                examples = batch[accelerator.process_index * local:(accelerator.process_index + 1) * local]
                metrics = trainer.step(examples, step)
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise training.NonFiniteLossError(
                        f"step {step}: non-finite loss/grad_norm ({metrics['loss']}, {metrics['grad_norm']}); "
                        f"lower --learning_rate or check the SFT checkpoint")
                step_times.append(metrics["time/step_s"])
                token_rates.append(metrics["train/tokens_per_s"])
                last = step == hp.max_steps
                if is_main:
                    history.append({**metrics, "step": step})
                    print(f"step {step}/{hp.max_steps}: reward {metrics['reward']:.3f} kl {metrics['kl']:.3f} "
                          f"value_loss {metrics['ppo/value_loss']:.4f} clipfrac {metrics['ppo/clipfrac']:.3f} "
                          f"{metrics['time/step_s']:.1f}s {metrics['train/tokens_per_s']:.1f} tok/s", flush=True)
                    info = None
                    if step % eval_steps == 0 or last:
                        val_metrics = validation.validate(trainer.unwrapped.policy, step)
                        history.append({**{f"val/{k}": v for k, v in val_metrics.items() if v is not None},
                                        "step": step})
                        info = {"step": step, "metrics": val_metrics}
                        if best is None or training.rank(val_metrics) > training.rank(best["metrics"]):
                            best = {"step": step, "metrics": {k: val_metrics[k] for k in
                                                              ("exec_acc", "format_rate", "reward_mean")}}
                            trainer.save(ckpt_root / "best", info, resumable=False)
                    log.write(history)
                    if step % save_steps == 0 or last:
                        trainer.save(ckpt_root / f"step_{step}", info, extra={"step": step, "best": best})
                        training.prune_step_folders(ckpt_root, cfg["training"]["save_total_limit"])
                accelerator.wait_for_everyone()  # the others wait while the main process validates/saves

            if is_main:
                trainer.save(ckpt_root / "final", validation.latest, resumable=False)
                for name in ("final", "best"):
                    if (ckpt_root / name).is_dir():
                        manifest.add_output(f"ckpt_{name}", ckpt_root / name)
                manifest.add_output("training_log", log.path)
                manifest.add_output("val_generations", folder / "val_generations")
                best = best or {}
                manifest.metrics.update(
                    global_step=hp.max_steps, best_step=best.get("step"),
                    **{f"best_val_{k}": v for k, v in best.get("metrics", {}).items()},
                    **{f"final_val_{k}": val_metrics.get(k) for k in ("exec_acc", "format_rate", "reward_mean")},
                    step_time_s_mean=sum(step_times) / len(step_times) if step_times else None,
                    peak_rss_gb=log.peak_rss_gb,
                    train_tokens_per_s=sum(token_rates) / len(token_rates) if token_rates else None,
                    final_kl_coef=trainer.kl_controller.value, reward_spec=str(spec_path or "built-in defaults"))
            accelerator.wait_for_everyone()
            return manifest.metrics
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    cli.run(main, parse_args)
