"""RLOO (REINFORCE with a leave-one-out baseline) from the SFT checkpoint with TRL's RLOOTrainer.

    python 07_train_rloo.py --policy_ckpt outputs/run_001/03_sft                 # its ckpt_sft/best
    python 07_train_rloo.py --policy_ckpt outputs/run_001/03_sft --max_steps 50 --algorithm.beta 0.0
    python 07_train_rloo.py --policy_ckpt outputs/run_001/03_sft --resume        # continue a run
    python 07_train_rloo.py --policy_ckpt outputs/run_001/03_sft --quick_test    # 8 prompts, 2 steps

Each step samples k = algorithm.num_generations completions per training prompt and scores them
with the weighted reward components; RLOO subtracts beta x each completion's KL to the SFT policy
from its reward (Ahmadian et al., 2024) and uses as its advantage that reward minus the mean of
the other k - 1 rewards of its prompt (the leave-one-out baseline: unbiased, no value model).
The SFT LoRA adapter itself is trained against a frozen copy (utils/rl.py).

Writes outputs/<run_id>/07_rloo/: the same layout as 06_grpo (ckpt_rloo/{step_N,best,final},
logs/training_log.json, val_generations/step_N.jsonl, trainer/, manifest.json) plus
logs/rloo_samples.jsonl: one line per sampled completion and step, {"step", "group", "id",
"reward" (the weighted total), "rewards" (each reward function's value), "baseline" (the mean of
the other k - 1 totals of its group), "loo_advantage" (reward - baseline: RLOO's advantage when
beta is 0)}, written from TRL's reward-function hooks (utils.rl.SampleLog).
"""
from utils import cli, rl
from utils import config as config_lib

MODULE = "07_rloo"


def build_trainer(cfg: dict, trainer_args: dict, inputs: dict, folder):
    """TRL's RLOOTrainer with the shared arguments and RLOO's own (configs/algorithms/rloo.yaml)."""
    from trl import RLOOConfig, RLOOTrainer

    rloo_config = RLOOConfig(
        **trainer_args,
        normalize_advantages=cfg["algorithm"]["normalize_advantages"],  # LOO advantages are centred already
    )
    # one forward per distinct prompt, not per completion (utils.rl.shared_prompt_logps)
    trainer_class = type("SharedPromptRLOOTrainer", (rl.SharedPromptForward, RLOOTrainer), {})
    return trainer_class(args=rloo_config, **inputs)


def parse_args(argv=None):
    return rl.parse_args(__doc__, "rloo", argv)


def main(args, extra_tokens=()) -> dict:
    # algorithm.baseline can only be "loo" (the config schema rejects anything else): TRL's
    # RLOOTrainer always uses the leave-one-out baseline; for a group-mean baseline run 06 GRPO
    cfg = config_lib.from_args(args, extra_tokens, rl.QUICK_TEST)
    folder = rl.output_folder(args, cfg, MODULE)
    sample_log = rl.SampleLog(folder / "logs" / "rloo_samples.jsonl", cfg["algorithm"]["num_generations"])
    return rl.run(MODULE, cfg, args, build_trainer, sample_log)


if __name__ == "__main__":
    cli.run(main, parse_args)
