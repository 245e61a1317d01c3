"""Learnability: does each method raise val reward where the signal is learnable?

    python tests/benchmarks/bench_learnability.py                           # all methods, default model
    python tests/benchmarks/bench_learnability.py --methods grpo rloo --rl_steps 30 --seed 2
    python tests/benchmarks/bench_learnability.py --report learn_s1         # the table of an earlier run

On the synthetic FinQA-format set (templated questions whose numbers are in the context), a short SFT
of the default model gives a policy that writes the JSON format but often the wrong program: room to
learn (160 steps, seed 1: val exec_acc 0.43). From that one SFT checkpoint, each method trains for a
fixed budget at one learning rate (--rl_steps optimizer steps of GRPO and RLOO, 4 prompts x 4 completions
each, and of DPO, on pairs from candidates sampled by the same SFT policy; --ppo_steps PPO iterations
of 8 prompts), and 10_evaluate scores the SFT start and
each method's final checkpoint on the same --val_examples val examples with greedy decoding: the same
protocol, examples and reward spec for every row. Printed per method: val reward_mean and exec_acc at
the SFT start and at the end, the change, and the wall time. The final checkpoint is scored, not the
best one (picking the best on these val examples would flatter every method).

Every stage is one of the numbered scripts, run as a subprocess into outputs/<run_id>/ with its log in
outputs/<run_id>/logs/; summary.json there holds the table, each method's row with its own budget. A rerun
with the same seed, config, data size and SFT steps reuses the SFT start; with the same val examples too,
it keeps the rows already there and (re)runs only the --methods given, so an interrupted benchmark
continues. On 2 CPU cores the default budget takes about 1.5 hours (SFT 29 min, GRPO 14, RLOO 17,
PPO 11, DPO 14 with its candidates, each evaluation about 1); the figures depend on the CPU load of
other processes only through the wall times.

What a CPU budget shows (seed 1): no method moves greedy val reward beyond noise. GRPO went 0.636 ->
0.667 in 15 steps at lr 3e-5, 0.603 in 60 steps, 0.616 in 30 steps at lr 1e-4; its training reward
rises, but that is mostly its sampling sharpening toward its own greedy answers. The measurement this
benchmark is for needs a GPU: --rl_steps 200 --ppo_steps 100 --rl_learning_rate 1e-5 --num_examples 2000
--val_examples 200.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from utils.driver import METHOD_STAGES, METHODS  # noqa: E402  (method -> module folder, script)
from utils.runs import read_jsonl  # noqa: E402

# what defines the SFT start: a rerun with the same values reuses it; with the same val_examples
# too, it also keeps the methods already scored
SFT_KEYS = ("seed", "config", "num_examples", "sft_steps")
START_KEYS = (*SFT_KEYS, "val_examples")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to (re)train and score (default: all four)")
    parser.add_argument("--run_id", default=None, help="default: learn_s<seed>")
    parser.add_argument("--seed", type=int, default=1, help="seed of every stage (default: %(default)s)")
    parser.add_argument("--config", default="smollm2-135m", help="model config (default: %(default)s)")
    parser.add_argument("--num_examples", type=int, default=600,
                        help="synthetic examples, split 80/10/10 (default: %(default)s)")
    parser.add_argument("--sft_steps", type=int, default=160,
                        help="SFT steps of the start policy: short on purpose (default: %(default)s)")
    parser.add_argument("--rl_steps", type=int, default=15,
                        help="optimizer steps of GRPO, RLOO (4 prompts x 4 completions each) and DPO "
                             "(default: %(default)s)")
    parser.add_argument("--ppo_steps", type=int, default=8,
                        help="PPO iterations (8 prompts each, so 8 see about as many prompts as 15 GRPO "
                             "steps) (default: %(default)s)")
    parser.add_argument("--rl_learning_rate", type=float, default=3e-5,
                        help="every method's learning rate: the algorithm YAMLs' 1e-5 is for runs of hundreds "
                             "of steps; a short budget needs a larger one (default: %(default)s)")
    parser.add_argument("--val_examples", type=int, default=60,
                        help="val examples scored at the start and the end (default: %(default)s)")
    parser.add_argument("--dpo_prompts", type=int, default=96,
                        help="train prompts whose sampled candidates make DPO's pairs (default: %(default)s)")
    parser.add_argument("--report", metavar="RUN_ID", help="only print the table of an earlier run")
    return parser.parse_args()


def run_stage(name: str, argv: list[str], run_dir: Path) -> float:
    """Run one numbered script, its output to logs/<name>.log; stop the benchmark if it fails."""
    log = run_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name:<16} python {' '.join(argv)}", flush=True)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}) after {elapsed:.0f}s: see {log}")
    print(f"{'':<16} done in {elapsed:.0f}s", flush=True)
    return elapsed


def evaluate(name: str, ckpt: Path, args, run_dir: Path, common: list[str]) -> dict:
    """Greedy val metrics of one checkpoint (10_evaluate), and the wall time."""
    elapsed = run_stage(f"10_{name}", ["10_evaluate.py", *common, "--policy_ckpt", str(ckpt),
                                       "--test_jsonl", str(run_dir / "data" / "val.jsonl"),
                                       "--max_examples", str(args.val_examples), "--policy_name", name], run_dir)
    metrics = json.loads((run_dir / "10_evaluation" / name / "metrics.json").read_text())
    return {key: metrics[key] for key in ("reward_mean", "exec_acc", "format_rate", "n_examples")} | {
        "eval_s": round(elapsed, 1)}


def example_rewards(run_dir: Path, name: str) -> dict:
    """Each val example's reward in 10_evaluate's predictions of `name` (empty if not there)."""
    path = run_dir / "10_evaluation" / name / "samples" / "predictions.jsonl"
    return {row["id"]: row["reward"] for row in read_jsonl(path)} if path.is_file() else {}


def report(run_dir: Path) -> None:
    """The table: per method, val reward_mean and exec_acc at the start and the end, and how many
    val examples scored higher / lower than at the start (a paired view of the same examples: with
    60 examples one exact answer moves reward_mean by about 0.02)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    start, setup = summary["sft_start"], summary["setup"]
    start_rewards = example_rewards(run_dir, "sft_start")
    print(f"\n{'method':<8} {'reward_mean start -> end':>26} {'change':>8} {'up/down':>8} "
          f"{'exec_acc start -> end':>23} {'format end':>10} {'steps':>6} {'lr':>8} {'train s':>8}")
    for method, row in summary["methods"].items():
        steps, lr = (row.get(key, setup.get(key)) for key in ("rl_steps", "rl_learning_rate"))
        end_rewards = example_rewards(run_dir, method)
        shared = [i for i in end_rewards if i in start_rewards]
        up = sum(end_rewards[i] > start_rewards[i] + 1e-9 for i in shared)
        down = sum(end_rewards[i] < start_rewards[i] - 1e-9 for i in shared)
        print(f"{method:<8} {start['reward_mean']:>12.3f} -> {row['reward_mean']:>9.3f} "
              f"{row['reward_mean'] - start['reward_mean']:>+8.3f} {f'{up}/{down}' if shared else '-':>8} "
              f"{start['exec_acc']:>10.3f} -> {row['exec_acc']:>8.3f} {row['format_rate']:>10.3f} {steps:>6} "
              f"{lr:>8} {row['train_s']:>8.0f}")
    print(f"\nSFT start: {setup['sft_steps']} SFT steps, format_rate {start['format_rate']:.3f}; "
          f"{start['n_examples']} val examples, greedy; seed {setup['seed']}; synthetic set of "
          f"{setup['num_examples']}; model {setup['config']}\nrun: {run_dir}")


def main(args) -> int:
    run_id = args.run_id or f"learn_s{args.seed}"
    run_dir = ROOT / "outputs" / run_id
    if args.report:
        report(ROOT / "outputs" / args.report)
        return 0
    common = ["--config", args.config, "--run_id", run_id, "--seed", str(args.seed)]
    data = run_dir / "data"
    spec = str(run_dir / "02_rewards" / "reward_spec.yaml")
    data_flags = ["--train_jsonl", str(data / "train.jsonl"), "--val_jsonl", str(data / "val.jsonl"),
                  "--reward_spec", spec]
    sft = run_dir / "03_sft" / "ckpt_sft" / "final"
    setup = {key: getattr(args, key) for key in START_KEYS}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    same = lambda keys: summary is not None and all(summary["setup"].get(k) == setup[k] for k in keys)  # noqa: E731
    if same(SFT_KEYS) and sft.is_dir():
        print(f"reusing the SFT start of {run_dir} (same {', '.join(SFT_KEYS)})", flush=True)
    else:
        run_stage("01_synthetic", ["01_prepare_dataset.py", *common, "--dataset", "synthetic",
                                   "--num_examples", str(args.num_examples), "--output_dir", str(data)], run_dir)
        run_stage("02_rewards", ["02_build_rewards.py", *common], run_dir)
        # one validation, at the end, on a few examples: the start is measured by 10_evaluate below
        run_stage("03_sft", ["03_sft_train.py", *common, *data_flags, "--max_steps", str(args.sft_steps),
                             "--validation.eval_steps", str(args.sft_steps), "--validation.num_samples", "8"],
                  run_dir)
        summary = None
    if summary is not None and same(START_KEYS):
        print(f"methods already scored on the same {args.val_examples} val examples: "
              f"{', '.join(summary['methods']) or 'none'}", flush=True)
    else:
        summary = {"setup": setup, "sft_start": evaluate("sft_start", sft, args, run_dir, common), "methods": {}}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for method in args.methods:
        module, script = METHOD_STAGES[method]
        steps = args.ppo_steps if method == "ppo" else args.rl_steps
        rl_flags = ["--max_steps", str(steps), "--learning_rate", str(args.rl_learning_rate),
                    "--validation.eval_steps", str(steps), "--validation.num_samples", "8"]
        if method == "dpo":
            run_stage("04_candidates", ["04_generate_candidates.py", *common, "--policy_ckpt", str(sft),
                                        "--split", "train", "--data_dir", str(data), "--max_examples",
                                        str(args.dpo_prompts), "--reward_spec", spec], run_dir)
            run_stage("08_preferences", ["08_build_prefs.py", *common,
                                         "--candidates_dir", str(run_dir / "04_candidates")], run_dir)
            argv = [script, "--base_or_sft_ckpt", str(sft), "--pairs",
                    str(run_dir / "08_preferences" / "pairs.jsonl"), "--val_jsonl", str(data / "val.jsonl"),
                    "--reward_spec", spec]
        else:
            argv = [script, "--policy_ckpt", str(sft), *data_flags]
        train_s = run_stage(module, [*argv, *common, *rl_flags], run_dir)
        final = run_dir / module / f"ckpt_{method}" / "final"
        budget = {"rl_steps": steps, "rl_learning_rate": args.rl_learning_rate,
                  **({"dpo_prompts": args.dpo_prompts} if method == "dpo" else {})}
        summary["methods"][method] = evaluate(method, final, args, run_dir, common) | {
            "train_s": round(train_s, 1), **budget}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
