"""The exec_acc question on one GPU: from one short SFT, does each method raise val exec_acc for the same
sampling budget?

    python tests/benchmarks/bench_gpu.py                                  # all methods, about 10 min (estimate)
    python tests/benchmarks/bench_gpu.py --methods grpo rloo --rl_steps 60 --seed 2
    python tests/benchmarks/bench_gpu.py --dataset finqa --config qwen2.5-0.5b
    python tests/benchmarks/bench_gpu.py --dry_run --output_root /tmp/bench   # CPU, tiny random model, ~1-2 min

Pipeline, every stage one of the numbered scripts run as a subprocess into <output_root>/<run_id>/ (logs
in logs/): 01 prepares the synthetic FinQA-format set (or the FinQA sample in datasets/finqa), 02 the
reward spec, 03 a short SFT at a GPU batch size in bf16; 10_evaluate scores the SFT start on the first
--val_examples val examples, greedy and with --num_samples sampled completions per prompt. Then each
method trains from that start for the same number of sampled completions, C = rl_steps x
prompts_per_step x num_generations:
  GRPO, RLOO  rl_steps optimizer steps of prompts_per_step prompts x num_generations completions
  PPO         C / ppo_rollout_batch_size iterations of one completion per prompt
  DPO         04 samples C candidates (num_generations per prompt on C / num_generations train
              prompts; more per prompt if the train split is smaller), 08 pairs them, 09 trains one
              epoch over the pairs with as many sequences per step (2 per pair) as GRPO's steps have
and 10_evaluate scores each method's final checkpoint (not its best: picking the best on these val
examples would flatter it) the same way. Every method samples at --temperature / --top_p, and the
sampled evaluation uses the same values: it measures what RL optimizes, the expected exec_acc of one
sample, with a CI over prompts much narrower than greedy's.

Printed: per method, greedy and sampled val exec_acc start -> end with the 95% bootstrap CI (over
prompts) of the end, pass@k of the sampled completions, the training wall time (subprocess, model
loading and the one validation at the end included), seconds per optimizer step (SFT, DPO: the
trainer's runtime over its steps, that validation included) and training tokens/s as each trainer
counts them (TRL: the prompt and completion tokens of its batches; PPO: generated tokens over the
whole step). summary.json in the run folder holds the same, with the metrics.json values it was read
from. Needs a CUDA GPU, the default model (setup.sh) and the venv's packages (trl, peft, datasets);
without a GPU it exits 2.
The default sizes are an estimate of what fits in 10 minutes on one H200, not yet measured: the
per-stage wall times it prints show where the time goes.

--dry_run runs the same pipeline on the CPU with a tiny random model (tests/fixtures/tiny_model.py),
float32 and the smallest budgets, everything under the run folder: it tests the plumbing, its
numbers mean nothing (tests/test_bench_gpu.py runs it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.benchmarks.stages import evaluate, run_stage  # noqa: E402
from utils.driver import METHOD_STAGES, METHODS  # noqa: E402  (method -> module folder, script)

# the parts of 10_evaluate's metrics.json kept for the start and each end
EVAL_KEYS = ("n_examples", "num_samples", "exec_acc", "exec_acc_ci95", "reward_mean", "format_rate",
             "sampled_exec_acc", "sampled_exec_acc_ci95", "sampled_reward_mean", "sampled_format_rate",
             "sampled_exec_pass_at_k", "eval_s")
# --dry_run's defaults (explicit flags still win): the smallest sizes that run every stage, as
# tests/test_driver.py's TINY_BUDGETS
DRY_RUN = dict(num_examples=40, val_examples=4, sft_steps=1, rl_steps=1, prompts_per_step=2, num_generations=2,
               num_samples=2, train_batch_size=2, gen_batch_size=4, train_val_examples=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to train (default: all four)")
    add("--seed", type=int, default=1, help="seed of every stage (default: %(default)s)")
    add("--run_id", help="run folder name (default: gpu_s<seed>)")
    add("--output_root", type=Path, default=ROOT / "outputs",
        help="where the run folder goes; the processed data goes in it too (default: outputs/)")
    add("--config", default="smollm2-135m", help="model config (default: %(default)s)")
    add("--dataset", choices=("synthetic", "finqa"), default="synthetic",
        help="synthetic: templated FinQA-format questions (utils/synthetic.py), learnable by a small model; "
             "finqa: the FinQA sample in datasets/finqa (100 train, 100 val) (default: %(default)s)")
    add("--num_examples", type=int, default=2000, help="synthetic examples, split 80/10/10 (default: %(default)s)")
    add("--val_examples", type=int, default=200,
        help="val examples scored at the start and the end (default: %(default)s)")
    add("--sft_steps", type=int, default=30,
        help="SFT steps of the start policy, short on purpose: it must leave room to learn (default: %(default)s)")
    add("--rl_steps", type=int, default=30,
        help="GRPO and RLOO optimizer steps; sets every method's completion budget (default: %(default)s)")
    add("--prompts_per_step", type=int, default=16, help="GRPO and RLOO prompts per step (default: %(default)s)")
    add("--num_generations", type=int, default=4,
        help="completions per prompt of GRPO and RLOO, and DPO's candidates per prompt (default: %(default)s)")
    add("--ppo_rollout_batch_size", type=int,
        help="PPO prompts (one completion each) per iteration; it must divide the completion budget "
             "(default: prompts_per_step x num_generations, so PPO runs rl_steps iterations)")
    add("--rl_learning_rate", type=float, default=3e-5,
        help="every method's learning rate, DPO's too: the algorithm YAMLs' 1e-5 (5e-6 for DPO) is for runs of "
             "hundreds of steps (default: %(default)s)")
    add("--temperature", type=float, default=0.8,
        help="sampling temperature of every method and of the sampled evaluation (default: %(default)s)")
    add("--top_p", type=float, default=1.0, help="nucleus sampling, likewise (default: %(default)s)")
    add("--num_samples", type=int, default=4,
        help="sampled completions per val prompt in the evaluations; 0: greedy only (default: %(default)s)")
    add("--train_batch_size", type=int, default=64,
        help="SFT batch, and PPO's micro-batch (default: %(default)s)")
    add("--gen_batch_size", type=int, default=64,
        help="prompts per generate call: evaluation, candidates, PPO rollouts, validation (default: %(default)s)")
    add("--train_val_examples", type=int, default=32,
        help="val examples of the one validation at the end of each training run (the scripts' own; "
             "10_evaluate measures) (default: %(default)s)")
    add("--dry_run", action="store_true",
        help="CPU, tiny random model, float32, tiny sizes (%s): tests the plumbing in a minute or two"
             % ", ".join(f"{k} {v}" for k, v in DRY_RUN.items()))
    args = parser.parse_args(argv)
    if args.dry_run:  # re-parse with the dry run's defaults, so explicit flags still win
        parser.set_defaults(**DRY_RUN)
        args = parser.parse_args(argv)
    args.run_id = args.run_id or f"gpu_s{args.seed}"
    args.completions = args.rl_steps * args.prompts_per_step * args.num_generations
    args.ppo_rollout_batch_size = args.ppo_rollout_batch_size or args.prompts_per_step * args.num_generations
    if args.completions % args.ppo_rollout_batch_size:
        parser.error(f"--ppo_rollout_batch_size {args.ppo_rollout_batch_size} must divide the completion budget "
                     f"{args.completions} (rl_steps x prompts_per_step x num_generations)")
    return args


def manifest_speed(run_dir: Path, module: str) -> dict:
    """Optimizer steps, s/step and tokens/s from a training module's manifest.json metrics: the
    GRPO, RLOO and PPO log step_time_s_mean, SFT and DPO only the trainer's runtime."""
    m = json.loads((run_dir / module / "manifest.json").read_text())["metrics"]
    steps = m.get("global_step")
    per_step = m.get("step_time_s_mean")
    if per_step is None and m.get("train_runtime_s") and steps:
        per_step = m["train_runtime_s"] / steps
    return {"steps": steps, "s_per_step": per_step, "tokens_per_s": m.get("train_tokens_per_s")}


def num(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def with_ci(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci95") or (None, None)
    return f"{num(metrics.get(key))} [{num(low, '.2f')}, {num(high, '.2f')}]"


def print_table(summary: dict) -> None:
    """One row for the SFT start (its values and CIs), one per method (start -> end, CI of the end)."""
    start, setup = summary["start"], summary["setup"]
    k = start.get("num_samples") or 0
    print(f"\n{'method':<6} {'greedy exec_acc [95% CI]':>32} {f'sampled exec_acc, k={k} [95% CI]':>32} "
          f"{f'pass@{k}':>14} {'samples':>8} {'steps':>6} {'train s':>8} {'s/step':>7} {'tok/s':>8}")
    rows = [("sft", start, {}, summary["sft"])]
    rows += [(method, start, row["end"], row) for method, row in summary["methods"].items()]
    for name, begin, end, row in rows:
        if end:
            greedy, sampled = (f"{num(begin.get(key))} -> {with_ci(end, key)}" for key in ("exec_acc", "sampled_exec_acc"))
            passk = f"{num(begin.get('sampled_exec_pass_at_k'))} -> {num(end.get('sampled_exec_pass_at_k'))}"
        else:
            greedy, sampled, passk = with_ci(begin, "exec_acc"), with_ci(begin, "sampled_exec_acc"), \
                num(begin.get("sampled_exec_pass_at_k"))
        print(f"{name:<6} {greedy:>32} {sampled:>32} {passk:>14} {row.get('completions', '-'):>8} "
              f"{row.get('steps') or '-':>6} {num(row['train_s'], '.0f'):>8} {num(row['s_per_step'], '.2f'):>7} "
              f"{num(row['tokens_per_s'], '.0f'):>8}")
    print(f"\n{start['n_examples']} val examples; sampled at temperature {setup['temperature']}, top_p "
          f"{setup['top_p']}; {setup['completions']} sampled completions per method; lr {setup['rl_learning_rate']}; "
          f"{setup['dataset']} data, model {setup['config']} ({setup['dtype']}), seed {setup['seed']}; "
          f"wall {summary['wall_s']:.0f}s{' (DRY RUN: numbers mean nothing)' if setup['dry_run'] else ''}"
          f"\nrun: {summary['run_dir']}")


def main(args) -> int:
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA GPU here; --dry_run runs the same pipeline on the CPU with a tiny model",
                  file=sys.stderr)
            return 2
    t0 = time.monotonic()
    run_dir = (args.output_root / args.run_id).resolve()
    data = run_dir / "data"
    common = ["--config", args.config, "--run_id", args.run_id, "--seed", args.seed,
              "--paths.output_root", run_dir.parent, "--paths.data_dir", data,
              # one micro-batch per optimizer step: GRPO's and RLOO's completions per step are then
              # exactly their per-device batch
              "--training.gradient_accumulation_steps", 1,
              "--generation.batch_size", args.gen_batch_size, "--validation.batch_size", args.gen_batch_size,
              # each training run validates once, at its end (the scripts always validate the last
              # step); 10_evaluate is the measurement
              "--validation.eval_steps", 10**6, "--validation.num_samples", args.train_val_examples]
    if args.dry_run:
        from tests.fixtures.tiny_model import build_tiny_model
        tiny = build_tiny_model(run_dir / "tiny_model")
        # 8 new tokens: a random model never stops early, so this bounds every generation
        common += ["--model.name_or_path", tiny, "--model.dtype", "float32", "--generation.max_new_tokens", 8,
                   "--validation.max_new_tokens", 8]
    else:
        common += ["--model.dtype", "bfloat16"]
    spec = run_dir / "02_rewards" / "reward_spec.yaml"
    train_jsonl, val_jsonl = data / "train.jsonl", data / "val.jsonl"
    data_flags = ["--train_jsonl", train_jsonl, "--val_jsonl", val_jsonl, "--reward_spec", spec]
    sample_flags = ["--algorithm.temperature", args.temperature, "--algorithm.top_p", args.top_p]

    def score(name: str, ckpt: Path) -> dict:
        """Greedy and sampled val metrics of one checkpoint: the EVAL_KEYS of its metrics.json."""
        metrics = evaluate(name, ckpt, run_dir, common, val_jsonl, args.val_examples, args.num_samples,
                           args.temperature, args.top_p)
        return {key: metrics[key] for key in EVAL_KEYS if key in metrics}

    source = (["--dataset", "synthetic", "--num_examples", args.num_examples] if args.dataset == "synthetic"
              else ["--dataset", "finqa", "--data_root", ROOT / "datasets" / "finqa"])
    run_stage("01_data", ["01_prepare_dataset.py", *common, *source, "--output_dir", data], run_dir)
    run_stage("02_rewards", ["02_build_rewards.py", *common], run_dir)
    sft_s = run_stage("03_sft", ["03_sft_train.py", *common, *data_flags, "--max_steps", args.sft_steps,
                                 "--training.per_device_train_batch_size", args.train_batch_size], run_dir)
    sft = run_dir / "03_sft" / "ckpt_sft" / "final"
    setup = {key: value if isinstance(value, (int, float, str, bool, list)) else str(value)
             for key, value in vars(args).items()} | {"dtype": "float32" if args.dry_run else "bfloat16"}
    summary = {"setup": setup, "run_dir": str(run_dir), "sft": {"train_s": round(sft_s, 1),
               **manifest_speed(run_dir, "03_sft")}, "start": score("sft_start", sft), "methods": {}}

    per_step = args.prompts_per_step * args.num_generations  # completions per GRPO/RLOO step
    for method in args.methods:
        module, script = METHOD_STAGES[method]
        rl_flags = [*common, "--learning_rate", args.rl_learning_rate]
        if method == "dpo":
            # C candidates from the SFT policy: num_generations per prompt, or more per prompt when
            # the train split has fewer than C / num_generations prompts
            n_train = len(train_jsonl.read_text(encoding="utf-8").splitlines())
            prompts = min(n_train, args.completions // args.num_generations)
            candidates = args.completions // prompts
            completions = prompts * candidates
            run_stage("04_candidates", ["04_generate_candidates.py", *common, "--policy_ckpt", sft,
                                        "--split", "train", "--data_dir", data, "--max_examples", prompts,
                                        "--num_candidates", candidates, "--temperature", args.temperature,
                                        "--top_p", args.top_p, "--reward_spec", spec], run_dir)
            run_stage("08_preferences", ["08_build_prefs.py", *common, "--candidates_dir",
                                         run_dir / "04_candidates"], run_dir)
            # one epoch over the pairs (dpo.yaml), 2 sequences per pair: per_step / 2 pairs per step
            # make as many sequences per optimizer step as GRPO's
            argv = [script, *rl_flags, "--base_or_sft_ckpt", sft, "--pairs", run_dir / "08_preferences" / "pairs.jsonl",
                    "--val_jsonl", val_jsonl, "--reward_spec", spec,
                    "--training.per_device_train_batch_size", max(1, per_step // 2)]
            # a random model writes no valid JSON, so 08 finds no pairs; 09's --quick_test then trains
            # on gold-vs-non-answer smoke pairs: the plumbing runs, nothing is measured
            argv += ["--quick_test", "--max_steps", 1] if args.dry_run else []
        elif method == "ppo":
            completions = args.completions
            argv = [script, *rl_flags, "--policy_ckpt", sft, *data_flags, *sample_flags,
                    "--max_steps", args.completions // args.ppo_rollout_batch_size,
                    "--algorithm.rollout_batch_size", args.ppo_rollout_batch_size,
                    "--training.per_device_train_batch_size", args.train_batch_size]
        else:  # GRPO, RLOO: TRL counts completions in the per-device batch
            completions = args.completions
            argv = [script, *rl_flags, "--policy_ckpt", sft, *data_flags, *sample_flags,
                    "--max_steps", args.rl_steps, "--algorithm.num_generations", args.num_generations,
                    "--training.per_device_train_batch_size", per_step]
        train_s = run_stage(module, argv, run_dir)
        summary["methods"][method] = {"completions": completions, "train_s": round(train_s, 1),
                                      **manifest_speed(run_dir, module),
                                      "end": score(method, run_dir / module / f"ckpt_{method}" / "final")}
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # after each method
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
