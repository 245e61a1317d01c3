"""GRPO from the SFT checkpoint with TRL's GRPOTrainer.

    python 06_train_grpo.py --policy_ckpt outputs/run_001/03_sft                 # its ckpt_sft/best
    python 06_train_grpo.py --policy_ckpt outputs/run_001/03_sft --max_steps 50 --algorithm.beta 0.0
    python 06_train_grpo.py --policy_ckpt outputs/run_001/03_sft --resume        # continue a run
    python 06_train_grpo.py --policy_ckpt outputs/run_001/03_sft --quick_test    # 8 prompts, 2 steps
    accelerate launch --config_file configs/accelerate/single_gpu.yaml 06_train_grpo.py \
        --policy_ckpt outputs/run_001/03_sft --algorithm.use_vllm true

Each step samples algorithm.num_generations completions per training prompt, scores them with
the reward components (exact, numeric, program, format) as separate reward functions weighted
by the reward spec, and takes a clipped policy-gradient step with each completion's advantage
relative to its group: (r - mean(group)) / std(group) with scale_rewards "group", plus beta x
the KL to the SFT policy. The SFT LoRA adapter itself is trained; TRL keeps a frozen copy of it
as the reference (utils/rl.py explains why that is the SFT policy, not the base model).

Writes outputs/<run_id>/06_grpo/:
  ckpt_grpo/{step_N,best,final}/   LoRA adapter + tokenizer + config.yaml (best by val exec_acc,
                                   ties by val reward_mean)
  logs/training_log.json           TRL's names (reward, reward_std, rewards/<component>/mean, kl,
                                   entropy, completions/mean_length, clip_ratio/*, grad_norm,
                                   learning_rate, step_time) + train/tokens_per_s + val/*
  val_generations/step_N.jsonl     greedy validation generations, scored
  trainer/checkpoint-N             optimizer, scheduler and RNG, for --resume
  manifest.json
"""
from utils import cli, rl
from utils import config as config_lib

MODULE = "06_grpo"


def build_trainer(cfg: dict, trainer_args: dict, inputs: dict, folder):
    """TRL's GRPOTrainer with the shared arguments and GRPO's own (configs/algorithms/grpo.yaml
    gives the reason for each value)."""
    from trl import GRPOConfig, GRPOTrainer

    algo = cfg["algorithm"]
    grpo_config = GRPOConfig(
        **trainer_args,
        loss_type=algo["loss_type"],            # token-level normalisation (dapo) or the paper's (grpo)
        epsilon=algo["epsilon"],                # ratio clipping, as in PPO
        scale_rewards=algo["scale_rewards"],    # divide advantages by the group's reward std, or not
        num_iterations=algo["num_iterations"],  # updates per generation batch (1: on-policy)
    )
    # one forward per distinct prompt, not per completion (utils.rl.shared_prompt_logps)
    trainer_class = type("SharedPromptGRPOTrainer", (rl.SharedPromptForward, GRPOTrainer), {})
    return trainer_class(args=grpo_config, **inputs)


def parse_args(argv=None):
    return rl.parse_args(__doc__, "grpo", argv)


def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens, rl.QUICK_TEST)
    return rl.run(MODULE, cfg, args, build_trainer)


if __name__ == "__main__":
    cli.run(main, parse_args)
