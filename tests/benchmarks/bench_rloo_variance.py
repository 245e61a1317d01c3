"""RLOO sanity check: on one batch, the leave-one-out baseline lowers the policy-gradient variance.

    python tests/benchmarks/bench_rloo_variance.py                        # default model, FinQA train
    python tests/benchmarks/bench_rloo_variance.py --policy_ckpt outputs/run_001/03_sft --num_prompts 8
    python tests/benchmarks/bench_rloo_variance.py --tiny                 # tiny random model, seconds

Samples k completions for each of a few prompts, scores them with the reward API, and computes
each sample's gradient g_i = grad log pi(y_i | x) of the trainable (LoRA) parameters once. The
two estimators then differ only in the weight of g_i, on the same samples and gradients:

    REINFORCE       c_i = R_i g_i
    RLOO            c_i = (R_i - b_i) g_i,   b_i = mean of the other k-1 rewards of its prompt

Both are unbiased (b_i does not depend on y_i). Printed: the total variance of the per-sample
estimate, E||c_i - mean(c)||^2 (the trace of its covariance), for each, and their ratio.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from utils import rl  # noqa: E402
from utils.modeling import resolve_checkpoint  # noqa: E402
from utils.generation import generate  # noqa: E402
from tests.fixtures.tiny_model import build_tiny_model  # noqa: E402
from utils.rewards import RewardSpec, load_spec, score  # noqa: E402
from utils.runs import atomic_write_json, read_jsonl  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DEFAULT_DATA = ROOT / "datasets" / "finqa_processed" / "train.jsonl"


def sequence_gradient(model, tokenizer, prompt, completion) -> torch.Tensor:
    """grad of log pi(completion | prompt) over the trainable parameters, flattened (float32)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logprob = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None]).sum()
    grads = torch.autograd.grad(logprob, params)
    return torch.cat([g.reshape(-1).float() for g in grads])


def total_variance(contributions: list[torch.Tensor]) -> float:
    """E||c - mean(c)||^2 over the per-sample contributions."""
    stacked = torch.stack(contributions)
    return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy_ckpt", default=None,
                        help="SFT run folder or checkpoint (default: the default model with a fresh LoRA)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="processed JSONL (default: %(default)s)")
    parser.add_argument("--reward_spec", default=None, help="reward_spec.yaml (default: the seed weights)")
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (a smoke run)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the figures to PATH: mean_reward, reinforce, leave_one_out, ratio")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    from utils.config import load
    cfg = load()
    if args.tiny:
        ckpt = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    else:
        ckpt = resolve_checkpoint(args.policy_ckpt) if args.policy_ckpt else DEFAULT_MODEL
    model, tokenizer, _ = rl.load_policy(ckpt, cfg)
    spec = load_spec(args.reward_spec) if args.reward_spec else RewardSpec()
    examples = read_jsonl(args.data)[:args.num_prompts]

    started = time.perf_counter()
    outputs = generate(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=args.max_new_tokens,
                       do_sample=True, temperature=args.temperature, num_return_sequences=args.k,
                       seed=args.seed, show_progress=False)
    rewards, gradients = [], []
    model.train()
    for example, output in zip(examples, outputs):
        for completion in output["completions"]:
            rewards.append(score(completion, example, spec).total)
            gradients.append(sequence_gradient(model, tokenizer, example["prompt"], completion))
    baselines = rl.leave_one_out_baselines(rewards, args.k)
    reinforce = total_variance([r * g for r, g in zip(rewards, gradients)])
    loo = total_variance([(r - b) * g for r, b, g in zip(rewards, baselines, gradients)])

    print(f"model: {ckpt}   prompts: {len(examples)} x k={args.k}   ({time.perf_counter() - started:.0f}s)")
    for i in range(len(examples)):
        group = rewards[i * args.k:(i + 1) * args.k]
        print(f"  prompt {i}: rewards {[round(r, 3) for r in group]}")
    print(f"mean reward {sum(rewards) / len(rewards):.4f}")
    print(f"gradient variance, plain REINFORCE (R):          {reinforce:.6g}")
    print(f"gradient variance, leave-one-out (R - b_loo):    {loo:.6g}")
    print(f"ratio RLOO / REINFORCE: {loo / reinforce:.4f}" if reinforce > 0 else "REINFORCE variance is 0")
    if args.json:
        atomic_write_json(args.json, {"mean_reward": sum(rewards) / len(rewards), "reinforce": reinforce,
                                      "leave_one_out": loo, "ratio": loo / reinforce if reinforce > 0 else None})


if __name__ == "__main__":
    main()
