"""Does each RL method learn from one shared SFT start on 2 CPU cores: the answer format, or accuracy?

    python tests/benchmarks/bench_learnability.py --task ladder --run_id ladder_l1     # accuracy, seeds 1 2 3
    python tests/benchmarks/bench_learnability.py --task ladder --methods grpo --rl_seeds 1   # one cell
    python tests/benchmarks/bench_learnability.py                                       # format task, seed 1
    python tests/benchmarks/bench_learnability.py --report ladder_l1                    # the tables of a run

Two tasks, one loop:
 - ladder (the accuracy question): the synthetic FinQA-format difficulty ladder (01 --levels, default
   level 1: one-step programs among distractor facts). Start: an SFT of the default model long enough
   to solve part of the task (--sft_steps 100 of 4 examples at the config's LoRA rate 2e-4: greedy
   exec_acc lands inside 0.25-0.6, so groups hold correct answers and no method starts at its
   ceiling). Scored on the first --eval_examples (200) test prompts, which neither SFT nor RL sees.
   Criterion per method: pooled sampled exec_acc gain with its 95 % CI above 0, a positive mean gain
   on every RL seed, KL within the target.
 - format: a deliberately weak SFT (12 steps) on the FinQA sample, scored on its 100 val prompts.
   Criterion per cell: sampled reward's paired CI above 0, sampled format up, KL within the target.

From the start every method trains on the same number of sampled completions (--completions; GRPO and
RLOO 16 per step, 4 prompts x 4, on the ladder 2 prompts x 8 in one micro-batch; PPO 8 per iteration; DPO on the pairs 08 builds from completions / 4
train prompts x 4 candidates of 04), for each RL seed (--rl_seeds) from the one SFT start (--seed), so
the spread over seeds is the method's own. All sample at the same temperature (0.8, top_p 1.0), and are
scored by the same 10_evaluate.py run: greedy, and --num_samples 4 samples per prompt at that
temperature. Each method keeps its own KL treatment (KL_TREATMENT), stated in the output. Learning
rates and the few flags a method needs at this budget: LEARNING_RATES, METHOD_FLAGS, with the reason.

Printed: per (method, seed) cell, sampled exec_acc start -> end with the paired difference and its
95 % bootstrap CI over prompts; greedy exec_acc with McNemar's p; pass@4 beside mean@4 (mean@4 up and
pass@4 flat: sharpening, the policy samples answers it could already find; pass@4 up: new solutions);
sampled reward and format; KL at the end against the target; training time, seconds per step, peak
memory. Per method: the mean +- std over seeds of the gain, the gain pooled over seeds (paired by
prompt: each prompt's mean over seeds, end minus start) with its CI, the verdict; a method-against-
method table of pooled differences in sampled exec_acc. DPO: held-out preference accuracy on pairs
built (04 + 08) from --holdout_prompts val prompts training never sees, before -> after with a CI.
--transfer also scores every final policy on the FinQA sample's val questions (its one-step ones apart).

Resumable: everything lives in outputs/<run_id>/ (cells in cells/<method>_seed<N>/, stage logs in
logs/); summary.json keeps the start and each finished cell, so a rerun with the same setup skips
them (--rerun retrains the cells named). Wall times depend on the CPU: the CPU flags are printed.
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.benchmarks.stages import evaluate, run_stage  # noqa: E402
from utils.comparison import mcnemar, paired_bootstrap_ci  # noqa: E402
from utils.driver import METHOD_STAGES, METHODS  # noqa: E402  (method -> module folder, script)
from utils.runs import read_json, sha256_file  # noqa: E402

# Per-method learning rates for a budget of ~10-20 optimizer steps (the YAMLs' 1e-5 / 5e-6 are for
# hundreds): GRPO and RLOO take one Adam step per 16 completions, so 8 steps at 1e-4 move the
# LoRA about as far as SFT's first steps (GRPO at 1e-4 raised valid JSON 90 -> 99 % in 8 steps).
# PPO: 2 update epochs instead of ppo.yaml's 4 (4 x 2 mini-batches passed the format criterion at lr
# 1e-5, +0.034, KL 0.25, but the update was 70 % of an iteration and the run ~33 min alone), so 4
# clipped steps per rollout at twice the rate. DPO: 3 epochs over its pairs at 5e-5 ended 8.06 nats
# from the reference (target 6); 2 epochs at 4e-5 move the LoRA about half as far (Adam: steps x rate).
LEARNING_RATES = {"grpo": 1e-4, "rloo": 1e-4, "ppo": 2e-5, "dpo": 4e-5}
METHOD_FLAGS = {"ppo": ["--algorithm.ppo_epochs", 2], "dpo": ["--epochs", 2, "--max_steps", -1]}
COMPLETIONS_PER_STEP = {"grpo": 16, "rloo": 16, "ppo": 8}  # the YAML defaults: 4 prompts x 4, 8 prompts x 1
# How each method holds the policy near the SFT start (the algorithm YAMLs' values, kept as they are:
# the comparison states them rather than forcing one treatment on all four).
KL_TREATMENT = {"ppo": "adaptive KL penalty in the reward, kl_coef from 0.05 toward target_kl 6",
                "grpo": "KL in the loss, beta 0.04", "rloo": "KL in the reward, beta 0.05",
                "dpo": "implicit, beta 0.1 (the DPO loss)"}
CANDIDATES = 4  # DPO: 04's candidates per train prompt
HOLDOUT_CANDIDATES, HOLDOUT_PAIRS_PER_PROMPT = 8, 4  # DPO's held-out pairs: 8 samples of a val prompt, <= 4 pairs
SAMPLE = {"temperature": 0.8, "top_p": 1.0}  # the training temperature of GRPO, RLOO and PPO
FINQA_RAW = "datasets/finqa"  # the FinQA sample (bash download.sh --from ../shared/data/finqa-sample)
ONE_MICRO_BATCH = ["--training.per_device_train_batch_size", 16, "--training.gradient_accumulation_steps", 1]
TASKS = {  # per-task defaults (the flags of the same names override them) and the flags of its stages
    "format": {"sft_steps": 12, "completions": 128, "eval_split": "val", "eval_examples": 100, "rl_seeds": None,
               "flags": [], "rl_flags": []},
    # ladder: 768 completions, 48 GRPO/RLOO steps of ~25 s (each prompt's forward run once for its group): at 256
    # (16 steps) GRPO's sampled exec_acc moved -0.006 [-0.037, +0.025], a format-sized budget
    "ladder": {"sft_steps": 100, "completions": 768, "eval_split": "test", "eval_examples": 200, "rl_seeds": [1, 2, 3],
               # one-step answers take about 30 tokens: 64 leaves room and stops a rambling sample (and the batch
               # waiting on it) early, in training and evaluation alike
               "flags": ["--generation.max_new_tokens", 64, "--validation.max_new_tokens", 64],
               # transformers rounds 3 % warmup of a 16-step run up to one step whose learning rate is 0: a
               # sixteenth of the budget would buy no update. A constant rate: under the config's cosine the
               # last quarter of a 16-step run moved at under 15 % of the rate (GRPO's first ladder run)
               "rl_flags": ["--training.warmup_ratio", 0, "--training.lr_scheduler_type", "constant"],
               # a start that solves a third of its prompts gives ~4 pairs a prompt: 2 per prompt and one epoch
               # keep DPO's steps (~30) where the format task's were, inside the time budget.
               # GRPO and RLOO: groups of 8 (2 prompts x 8 per step, the same 16 completions). The start's
               # per-prompt accuracy is bimodal (pass@4 0.55 vs mean@4 0.32), so in groups of 4 two thirds
               # of the groups held one reward only (frac_reward_zero_std 0.66) and gave no gradient. The 16 in one
               # micro-batch: both prompts' forward passes then run once each (utils.rl.shared_prompt_logps),
               # 9x faster than four micro-batches of 4 rows (bench_train_step.py --rl_groups 2)
               "pairs_per_prompt": 2, "method_flags": {"dpo": ["--epochs", 1, "--max_steps", -1],
                                                       "grpo": ["--algorithm.num_generations", 8, *ONE_MICRO_BATCH],
                                                       "rloo": ["--algorithm.num_generations", 8, *ONE_MICRO_BATCH]}},
}
LADDER_EXAMPLES = 2500  # 2000 train, 250 val, 250 test (80/10/10)
START_KEYS = ("task", "levels", "seed", "config", "data_root", "sft_steps", "eval_examples", "num_samples",
              "holdout_prompts")  # what the start and its evaluation depend on; a cell also on --completions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(TASKS), default="format",
                        help="ladder: accuracy on the synthetic difficulty ladder; format: the answer format on the "
                             "FinQA sample from a weak start (default: %(default)s)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1], help="ladder levels (default: 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to train and score (default: all four)")
    parser.add_argument("--run_id", default=None, help="default: learn_s<seed> (format), ladder_l<levels> (ladder)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the shared start: data, SFT, start evaluation (default: 1 format, 0 ladder)")
    parser.add_argument("--rl_seeds", type=int, nargs="+", default=None,
                        help="seeds of the RL runs, each from the same start (default: --seed for format, 1 2 3 "
                             "for ladder)")
    parser.add_argument("--config", default="smollm2-135m", help="model config (default: %(default)s)")
    parser.add_argument("--data_root", default=FINQA_RAW,
                        help="raw FinQA folder, train/dev/test.json (default: %(default)s, the sample)")
    parser.add_argument("--sft_steps", type=int, default=None,
                        help="SFT steps of 4 examples for the start (default: 12 format, 100 ladder)")
    parser.add_argument("--completions", type=int, default=None,
                        help="sampled completions each method trains on per seed (default: 128 format, 768 ladder); cells "
                             "trained on another number are retrained")
    parser.add_argument("--eval_examples", type=int, default=None,
                        help="held-out prompts scored (default: 100 val prompts format, 200 test prompts ladder)")
    parser.add_argument("--num_samples", type=int, default=4,
                        help="sampled completions per scored prompt (default: %(default)s)")
    parser.add_argument("--holdout_prompts", type=int, default=80,
                        help="val prompts whose pairs measure DPO's held-out preference accuracy (default: %(default)s)")
    parser.add_argument("--transfer", action="store_true",
                        help="also score the start and every final policy on the FinQA sample's val questions")
    parser.add_argument("--memory", action="store_true",
                        help="also run one full-size default step per method in float32 and print its peak memory")
    parser.add_argument("--rerun", action="store_true", help="retrain the --methods x --rl_seeds cells already done")
    parser.add_argument("--report", metavar="RUN_ID", help="only print the tables of an earlier run")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.seed = args.seed if args.seed is not None else (0 if args.task == "ladder" else 1)
    for key in ("sft_steps", "completions", "eval_examples"):
        setattr(args, key, getattr(args, key) or task[key])
    args.rl_seeds = args.rl_seeds or task["rl_seeds"] or [args.seed]
    args.levels = sorted(set(args.levels)) if args.task == "ladder" else None
    args.run_id = args.run_id or (f"learn_s{args.seed}" if args.task == "format"
                                  else f"ladder_l{''.join(map(str, args.levels))}")
    return args


# --- measurements ---------------------------------------------------------------------------

def per_prompt(run_dir: Path, name: str) -> dict[str, dict]:
    """10_evaluate's breakdown.csv of policy `name`, by prompt id."""
    with open(run_dir / "10_evaluation" / name / "breakdown.csv", newline="", encoding="utf-8") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def column(rows: dict, ids: list, name: str) -> list[float]:
    """One breakdown column over `ids` as numbers (True/False as 1/0)."""
    return [1.0 if rows[i][name] == "True" else 0.0 if rows[i][name] == "False" else float(rows[i][name]) for i in ids]


def paired_change(run_dir: Path, start: str, end: str, seed: int) -> dict:
    """End minus start on the same prompts: sampled exec_acc and reward (mean, paired bootstrap CI over
    prompts), pass@K, and greedy exec_acc and format (McNemar: prompts only the end / only the start got)."""
    a, b = per_prompt(run_dir, end), per_prompt(run_dir, start)
    ids = [i for i in a if i in b]
    change = {"n_paired": len(ids)}
    for name in ("sampled_exec_acc", "sampled_reward_mean", "sampled_exec_pass"):
        after, before = column(a, ids, name), column(b, ids, name)
        change[f"{name}_diff"] = (sum(after) - sum(before)) / len(ids)
        change[f"{name}_diff_ci95"] = paired_bootstrap_ci(after, before, seed=seed, n_resamples=2000)
    for name in ("exec_correct", "format_valid"):
        change[f"greedy_{name}_mcnemar"] = list(mcnemar(column(a, ids, name), column(b, ids, name)))
    return change


def pooled(run_dir: Path, names_a: list[str], names_b: list[str], seed: int, key: str = "sampled_exec_acc") -> dict:
    """mean(A) - mean(B) of a breakdown column, paired by prompt and pooled over seeds: each prompt's
    mean over A's policies minus its mean over B's (one policy for the start), bootstrapped over prompts."""
    tables_a, tables_b = [per_prompt(run_dir, n) for n in names_a], [per_prompt(run_dir, n) for n in names_b]
    ids = [i for i in tables_a[0] if all(i in t for t in tables_a + tables_b)]
    mean_a = [statistics.fmean(column(t, [i], key)[0] for t in tables_a) for i in ids]
    mean_b = [statistics.fmean(column(t, [i], key)[0] for t in tables_b) for i in ids]
    return {"n_prompts": len(ids), "diff": (sum(mean_a) - sum(mean_b)) / len(ids),
            "ci95": paired_bootstrap_ci(mean_a, mean_b, seed=seed, n_resamples=2000)}


def final_kl(cell_dir: Path, method: str) -> float | None:
    """KL to the reference at the end, nats per completion, from the last training log entry: PPO's
    ppo/kl_per_completion; GRPO/RLOO's per-token kl x mean completion length; DPO's kl (per sequence,
    on its pairs)."""
    module = METHOD_STAGES[method][0]
    entries = [e for e in read_json(cell_dir / module / "logs" / "training_log.json")["log_history"] if "loss" in e]
    last = entries[-1] if entries else {}
    if method == "ppo":
        return last.get("ppo/kl_per_completion")
    if method in ("grpo", "rloo") and last.get("kl") is not None:
        return last["kl"] * last["completions/mean_length"]
    return last.get("kl")


def kl_target() -> float:
    import yaml

    return float(yaml.safe_load((ROOT / "configs" / "algorithms" / "ppo.yaml").read_text())["algorithm"]["target_kl"])


def holdout_pref_ci(cell_dir: Path, seed: int) -> dict:
    """DPO's held-out preference accuracy before -> after (the policy's own log-prob ranking of each held-out
    pair, 09's metrics), with a paired CI over prompts: a prompt's pairs share it, so the bootstrap resamples
    prompts, each prompt's share of correctly ranked pairs before and after."""
    metrics = read_json(cell_dir / "09_dpo" / "metrics.json")
    out = {key: metrics.get(key) for key in ("holdout_n_pairs", "holdout_n_prompts", "holdout_pref_acc_before",
                                              "holdout_logp_acc_after", "holdout_pref_acc_after")}
    ids = metrics.get("holdout_pair_prompt_ids")
    if ids:
        by_prompt = {}
        for prompt, before, after in zip(ids, metrics["holdout_logp_correct_before"],
                                         metrics["holdout_logp_correct_after"]):
            by_prompt.setdefault(prompt, []).append((before, after))
        before = [statistics.fmean(b for b, _ in pairs) for pairs in by_prompt.values()]
        after = [statistics.fmean(a for _, a in pairs) for pairs in by_prompt.values()]
        out["diff_ci95"] = paired_bootstrap_ci(after, before, seed=seed, n_resamples=2000)
    return out


def cpu_flags() -> str:
    done = subprocess.run("grep -o -w 'amx_bf16\\|avx512_bf16\\|avx2' /proc/cpuinfo | sort -u", shell=True,
                          capture_output=True, text=True)
    return " ".join(done.stdout.split()) or "unknown"


# --- stages -----------------------------------------------------------------------------------

class Start:
    """The shared start of a run: its folder, data, reward spec and SFT checkpoint, and the flags every stage gets."""

    def __init__(self, args):
        self.dir = ROOT / "outputs" / args.run_id
        self.data = self.dir / "data"
        self.spec = self.dir / "02_rewards" / "reward_spec.yaml"
        self.sft = self.dir / "03_sft" / "ckpt_sft" / "final"
        self.common = ["--config", args.config, "--run_id", args.run_id, "--seed", args.seed]
        self.data_flags = ["--train_jsonl", self.data / "train.jsonl", "--val_jsonl", self.data / "val.jsonl",
                           "--reward_spec", self.spec]
        self.eval_jsonl = self.data / f"{TASKS[args.task]['eval_split']}.jsonl"
        self.flags, self.rl_flags = TASKS[args.task]["flags"], TASKS[args.task]["rl_flags"]
        self.finqa_val = self.dir / "finqa_data" / "val.jsonl"
        self.holdout_pairs = self.dir / "dpo_holdout" / "08_preferences" / "pairs.jsonl"

    def cell(self, method: str, seed: int) -> tuple[Path, list]:
        """A (method, seed) cell's folder and flags: outputs/<run>/cells/<method>_seed<N>/."""
        name = f"{method}_seed{seed}"
        return self.dir / "cells" / name, ["--config", self.common[1], "--run_id", name, "--seed", seed,
                                           "--paths.output_root", self.dir / "cells"]


def sft_done(start: Start, steps: int) -> bool:
    """The start's SFT completed `steps` steps on the data now in start.data (same sha256)."""
    try:
        manifest = read_json(start.dir / "03_sft" / "manifest.json")
    except (FileNotFoundError, ValueError):
        return False
    train = manifest.get("inputs", {}).get("train", {})
    return (manifest.get("status") == "complete" and manifest["config"]["training"]["max_steps"] == steps
            and start.sft.is_dir() and train.get("sha256") == sha256_file(start.data / "train.jsonl"))


def build_start(args, start: Start) -> dict:
    """Data, reward spec, SFT, and the start's evaluations (plus DPO's held-out pairs and the FinQA data)."""
    if args.task == "ladder":
        data = ["--dataset", "synthetic", "--levels", *args.levels, "--num_examples", LADDER_EXAMPLES]
    else:
        data = ["--dataset", "finqa", "--data_root", args.data_root]
    run_stage("01_data", ["01_prepare_dataset.py", *start.common, *data, "--output_dir", start.data], start.dir)
    run_stage("02_rewards", ["02_build_rewards.py", *start.common], start.dir)
    sft = ["03_sft_train.py", *start.common, *start.data_flags, *start.flags, "--max_steps", args.sft_steps,
           "--validation.eval_steps", args.sft_steps, "--validation.num_samples", 16, "--training.save_steps", 20]
    if sft_done(start, args.sft_steps):  # the slowest stage of the start: kept when a later one failed
        print(f"{'03_sft':<16} kept: {start.sft} completed {args.sft_steps} steps on this data", flush=True)
    else:
        run_stage("03_sft", sft, start.dir)
    return evaluate("start", start.sft, start.dir, start.common, start.eval_jsonl, args.eval_examples,
                    args.num_samples, **SAMPLE, extra=start.flags)


def holdout_pairs(args, start: Start) -> Path:
    """DPO's held-out pairs, once per start: 04 on the first --holdout_prompts val prompts x 8 candidates of the
    SFT policy, paired by 08 (at most 4 pairs a prompt). Training samples train prompts only."""
    if not start.holdout_pairs.is_file():
        folder = start.dir / "dpo_holdout"
        run_stage("04_holdout", ["04_generate_candidates.py", *start.common, "--policy_ckpt", start.sft, "--split",
                                 "val", "--data_dir", start.data, "--max_examples", args.holdout_prompts,
                                 "--num_candidates", HOLDOUT_CANDIDATES, "--temperature", SAMPLE["temperature"],
                                 "--top_p", SAMPLE["top_p"], "--reward_spec", start.spec, *start.flags,
                                 "--output_dir", folder / "04_candidates"], start.dir)
        run_stage("08_holdout", ["08_build_prefs.py", *start.common, "--candidates_dir", folder / "04_candidates",
                                 "--max_pairs_per_prompt", HOLDOUT_PAIRS_PER_PROMPT,
                                 "--output_dir", folder / "08_preferences"], start.dir)
    return start.holdout_pairs


def method_flags(args, method: str) -> list:
    """A method's flags beyond its YAML and learning rate: the task's own where it sets them, else METHOD_FLAGS."""
    return TASKS[args.task].get("method_flags", {}).get(method, METHOD_FLAGS.get(method, []))


def train(method: str, args, start: Start, seed: int, extra=()) -> float:
    """One (method, seed) cell's training run on args.completions sampled completions; returns its wall seconds."""
    cell_dir, common = start.cell(method, seed)
    module, script = METHOD_STAGES[method]
    lr = ["--learning_rate", LEARNING_RATES[method]]
    if method == "dpo":
        prompts = args.completions // CANDIDATES
        seconds = run_stage("04_candidates", [
            "04_generate_candidates.py", *common, "--policy_ckpt", start.sft, "--split", "train", "--data_dir",
            start.data, "--max_examples", prompts, "--num_candidates", CANDIDATES, "--temperature",
            SAMPLE["temperature"], "--top_p", SAMPLE["top_p"], "--reward_spec", start.spec, *start.flags], cell_dir)
        per_prompt = TASKS[args.task].get("pairs_per_prompt")
        seconds += run_stage("08_preferences", ["08_build_prefs.py", *common, "--candidates_dir",
                                                cell_dir / "04_candidates",
                                                *(["--max_pairs_per_prompt", per_prompt] if per_prompt else [])],
                             cell_dir)
        holdout = ["--holdout_pairs", holdout_pairs(args, start)] if args.task == "ladder" else []
        argv = [script, *common, "--policy_ckpt", start.sft, "--pairs", cell_dir / "08_preferences" / "pairs.jsonl",
                *holdout, *start.data_flags[2:], *start.flags, *start.rl_flags, *method_flags(args, "dpo"), *lr]
        return seconds + run_stage(module, [*argv, "--training.logging_steps", 1, *extra], cell_dir)
    steps = args.completions // COMPLETIONS_PER_STEP[method]
    argv = [script, *common, "--policy_ckpt", start.sft, *start.data_flags, *start.flags, *start.rl_flags,
            "--max_steps", steps, *lr,
            *method_flags(args, method), "--validation.eval_steps", steps, "--validation.num_samples", 4,
            "--training.logging_steps", 1, "--training.save_steps", steps]
    return run_stage(module, [*argv, *extra], cell_dir)


def memory_probe(method: str, args, start: Start) -> float | None:
    """Peak resident GB of one full-size default step in float32 (its own cell, nothing else kept)."""
    cell_dir, common = start.cell(method, f"mem{args.seed}")
    module, script = METHOD_STAGES[method]
    flags = ["--model.dtype", "float32", "--max_steps", 1, "--validation.eval_steps", 1,
             "--validation.num_samples", 1, "--training.save_steps", 1]
    inputs = ["--pairs", start.cell(method, args.rl_seeds[0])[0] / "08_preferences" / "pairs.jsonl",
              *start.data_flags[2:]] if method == "dpo" else start.data_flags
    run_stage(f"mem_{method}", [script, *common, "--policy_ckpt", start.sft, *inputs, *flags], cell_dir)
    return read_json(cell_dir / module / "manifest.json")["metrics"].get("peak_rss_gb")


def rloo_variance(args, start: Start) -> dict:
    """bench_rloo_variance.py from the start policy on 16 train prompts x 4 samples: the gradient
    variance of plain REINFORCE and of the leave-one-out estimator on the same samples."""
    run_stage("rloo_variance", ["tests/benchmarks/bench_rloo_variance.py", "--policy_ckpt", start.sft, "--data",
                                start.data / "train.jsonl", "--reward_spec", start.spec, "--num_prompts", 16, "--k", 4,
                                "--max_new_tokens", 96, "--seed", args.seed, "--json", start.dir / "rloo_variance.json"],
              start.dir)
    return read_json(start.dir / "rloo_variance.json")


def finqa_transfer(args, start: Start, name: str, ckpt: Path) -> dict:
    """A policy scored on the FinQA sample's val questions (greedy + samples), overall and by level."""
    if not start.finqa_val.is_file():
        run_stage("01_finqa", ["01_prepare_dataset.py", *start.common, "--dataset", "finqa", "--data_root",
                               args.data_root, "--output_dir", start.finqa_val.parent], start.dir)
    metrics = evaluate(f"finqa_{name}", ckpt, start.dir, start.common, start.finqa_val, 100, args.num_samples,
                       **SAMPLE)  # FinQA's answers are longer than the ladder's: the config's budget
    return {key: metrics.get(key) for key in ("n_examples", "exec_acc", "sampled_exec_acc", "sampled_exec_pass_at_k",
                                               "format_rate", "sampled_format_rate", "by_level")}


# --- the tables -------------------------------------------------------------------------------

TIME_PARTS = ("generate", "rewards", "reference", "update", "step")


def step_times(cell_dir: Path, method: str) -> dict:
    """Median seconds per step of each time/<part>_s in the method's training log (DPO logs none): the
    median, so that a step slowed by another process on the same cores does not count."""
    entries = [e for e in read_json(cell_dir / METHOD_STAGES[method][0] / "logs" / "training_log.json")["log_history"]
               if e.get("time/step_s") is not None]
    return {part: statistics.median(e[f"time/{part}_s"] for e in entries) for part in TIME_PARTS} if entries else {}


def zero_std_share(cell_dir: Path, method: str) -> float | None:
    """GRPO/RLOO: the mean over steps of frac_reward_zero_std, the share of groups whose completions all got one
    reward and so carry no policy gradient (None for PPO and DPO, which log none)."""
    entries = [e["frac_reward_zero_std"] for e in read_json(
        cell_dir / METHOD_STAGES[method][0] / "logs" / "training_log.json")["log_history"] if "frac_reward_zero_std" in e]
    return statistics.fmean(entries) if entries else None


def cell_passed(row: dict, start: dict, target: float) -> bool:
    """The format task's criterion: sampled reward up (paired CI above 0), sampled format up, KL within target."""
    return (row["change"]["sampled_reward_mean_diff_ci95"][0] > 0
            and row["end"]["sampled_format_rate"] > start["sampled_format_rate"]
            and (row["kl"] is None or row["kl"] <= target))


def method_summary(summary: dict, method: str, run_dir: Path, target: float) -> dict | None:
    """A method over its seeds: gain mean and std, pooled gain with CI, and the ladder criterion."""
    cells = {seed: row for key, row in summary["cells"].items() if row["method"] == method for seed in [row["seed"]]}
    if not cells:
        return None
    gains = [row["change"]["sampled_exec_acc_diff"] for row in cells.values()]
    pool = pooled(run_dir, [row["policy"] for row in cells.values()], ["start"], summary["setup"]["seed"])
    kls = [row["kl"] for row in cells.values() if row["kl"] is not None]
    return {"seeds": sorted(cells), "gain_mean": statistics.fmean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0, "pooled": pool, "kl_max": max(kls, default=None),
            "passed": pool["ci95"][0] > 0 and all(g > 0 for g in gains) and all(k <= target for k in kls)}


def fmt_ci(diff: float, ci: list) -> str:
    return f"{diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def report(run_dir: Path) -> None:
    summary = read_json(run_dir / "summary.json")
    start, setup, target = summary["start"], summary["setup"], kl_target()
    rows = sorted(summary["cells"].values(), key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    ladder = setup["task"] == "ladder"
    data = (f"synthetic FinQA-format ladder, levels {' '.join(map(str, setup['levels']))}, first "
            f"{start['n_examples']} test prompts" if ladder else f"FinQA sample, {start['n_examples']} val prompts")
    print(f"\nTask {setup['task']}: {data}. Start: SFT of {setup['config']} ({setup['sft_steps']} steps of 4, seed "
          f"{setup['seed']}): exec_acc greedy {start['exec_acc']:.3f}, sampled {start['sampled_exec_acc']:.3f}, "
          f"pass@{setup['num_samples']} {start['sampled_exec_pass_at_k']:.3f}; format greedy {start['format_rate']:.3f}, "
          f"sampled {start['sampled_format_rate']:.3f}; sampled reward {start['sampled_reward_mean']:.3f}")
    if by_level := start.get("by_level"):
        print("  start by level: " + "; ".join(f"level {k}: n {v['n']}, greedy {v['exec_acc']:.3f}, sampled "
                                                f"{v.get('sampled_exec_acc', float('nan')):.3f}" for k, v in by_level.items()))
    arrow = lambda key, end, digits=3: f"{start[key]:.{digits}f} -> {end[key]:.{digits}f}"  # noqa: E731
    print(f"\n{'cell':<12} {'sampled exec_acc':<16} {'diff [95% CI]':<26} {'greedy exec_acc':<16} {'McNemar p':>9}  "
          f"{'pass@k':<14} {'pass diff [95% CI]':<26} {'sampled reward':<16} {'reward diff [95% CI]':<26} "
          f"{'sampled format':<16} {'KL':>6} {'zero-std':>8} {'train s':>8} {'s/step':>7} {'peak GB':>8}"
          + ("" if ladder else "  verdict"))
    for row in rows:
        end, change = row["end"], row["change"]
        kl = "-" if row["kl"] is None else f"{row['kl']:.2f}"
        times = step_times(run_dir / "cells" / row["policy"], row["method"])
        step = f"{times['step']:.1f}" if times else "-"
        zero_std = zero_std_share(run_dir / "cells" / row["policy"], row["method"])
        print(f"{row['policy']:<12} {arrow('sampled_exec_acc', end):<16} "
              f"{fmt_ci(change['sampled_exec_acc_diff'], change['sampled_exec_acc_diff_ci95']):<26} "
              f"{arrow('exec_acc', end):<16} {change['greedy_exec_correct_mcnemar'][2]:>9.3g}  "
              f"{arrow('sampled_exec_pass_at_k', end):<14} "
              f"{fmt_ci(change['sampled_exec_pass_diff'], change['sampled_exec_pass_diff_ci95']):<26} "
              f"{arrow('sampled_reward_mean', end):<16} "
              f"{fmt_ci(change['sampled_reward_mean_diff'], change['sampled_reward_mean_diff_ci95']):<26} "
              f"{arrow('sampled_format_rate', end):<16} {kl:>6} {'-' if zero_std is None else f'{zero_std:.2f}':>8} "
              f"{row['train_s']:>8.0f} {step:>7} "
              f"{row.get('peak_rss_gb') or float('nan'):>8.2f}"
              + ("" if ladder else f"  {'PASS' if cell_passed(row, start, target) else 'FAIL'}"))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    if ladder:
        print(f"\n{'method':<6} {'seeds':<8} {'gain mean +- std':<18} {'pooled gain [95% CI]':<26} {'KL max':>7}  "
              f"{'lr, flags':<28} verdict")
        per_method = {m: method_summary(summary, m, run_dir, target) for m in methods}
        for method, info in per_method.items():
            flags = " ".join(next(r["flags"] for r in rows if r["method"] == method))
            kl = "-" if info["kl_max"] is None else f"{info['kl_max']:.2f}"
            print(f"{method:<6} {','.join(map(str, info['seeds'])):<8} "
                  f"{info['gain_mean']:+.3f} +- {info['gain_std']:.3f}{'':<3} "
                  f"{fmt_ci(info['pooled']['diff'], info['pooled']['ci95']):<26} {kl:>7}  "
                  f"{f'{LEARNING_RATES[method]:.0e} {flags}':<28} {'PASS' if info['passed'] else 'FAIL'}")
        if len(methods) > 1:
            print("\nMethod against method: pooled paired difference in sampled exec_acc (row minus column), 95% CI; "
                  "* = CI excludes 0")
            for a in methods:
                cells = []
                for b in methods:
                    if a == b:
                        cells.append(f"{'-':<28}")
                        continue
                    names = [[r["policy"] for r in rows if r["method"] == m] for m in (a, b)]
                    diff = pooled(run_dir, names[0], names[1], setup["seed"])
                    star = "*" if diff["ci95"][0] > 0 or diff["ci95"][1] < 0 else " "
                    cells.append(f"{fmt_ci(diff['diff'], diff['ci95'])}{star}")
                print(f"{a:<6} " + " ".join(f"{c:<28}" for c in cells) + "   columns: " + " ".join(methods))
    for row in rows:
        if pref := row.get("pref_acc"):
            ci = pref.get("diff_ci95")
            print(f"\n{row['policy']} held-out preference accuracy ({pref.get('holdout_n_pairs')} pairs from "
                  f"{pref.get('holdout_n_prompts')} val prompts training never saw): the policy's own log-prob "
                  f"ranking {pref.get('holdout_pref_acc_before'):.3f} -> {pref.get('holdout_logp_acc_after'):.3f}"
                  + (f", paired diff {fmt_ci(pref['holdout_logp_acc_after'] - pref['holdout_pref_acc_before'], ci)}"
                     if ci else "") + f"; DPO's implicit-reward ranking after {pref.get('holdout_pref_acc_after'):.3f}")
    if transfer := summary.get("transfer"):
        print("\nTransfer to the FinQA sample's val questions (greedy + samples), overall and one-step questions:")
        for name, info in transfer.items():
            one = (info.get("by_level") or {}).get("1", {})
            print(f"  {name:<12} exec_acc greedy {info['exec_acc']:.3f}, sampled {info['sampled_exec_acc']:.3f}, "
                  f"pass@k {info['sampled_exec_pass_at_k']:.3f}, format {info['format_rate']:.3f}; one-step "
                  f"(n {one.get('n', 0)}): greedy {one.get('exec_acc', float('nan')):.3f}, sampled "
                  f"{one.get('sampled_exec_acc', float('nan')):.3f}")
    if variance := summary.get("rloo_variance"):
        print(f"\nRLOO check, 16 train prompts x 4 samples from the start (mean reward {variance['mean_reward']:.3f}): "
              f"gradient variance plain REINFORCE {variance['reinforce']:.4g}, leave-one-out "
              f"{variance['leave_one_out']:.4g} (ratio {variance['leave_one_out'] / variance['reinforce']:.2f})")
    criterion = ("PASS (per method): pooled sampled exec_acc gain's 95% CI above 0, a positive gain on every seed, "
                 "KL <= target on every seed" if ladder else
                 "PASS (per cell): sampled reward's paired 95% CI above 0, sampled format up, KL <= target")
    print(f"\n{criterion}; KL: nats per completion, last training log entry, target {target:g} (ppo.yaml's "
          f"target_kl).\nFair by construction: one SFT start for every method and seed; "
          f"{' or '.join(str(n) for n in sorted({r.get('completions', setup.get('completions')) for r in rows})) or '-'} "
          f"sampled completions per cell (DPO: pairs from as many candidates); every sampler at temperature "
          f"{SAMPLE['temperature']}, top_p {SAMPLE['top_p']}; the same evaluation (greedy + {setup['num_samples']} "
          f"samples per prompt at that temperature). KL treatment: "
          + "; ".join(f"{m} {KL_TREATMENT[m]}" for m in methods)
          + f".\nRL seeds {', '.join(str(r['seed']) for r in rows if r['method'] == methods[0]) if rows else '-'} "
          f"from the one start (seed {setup['seed']}): the spread over seeds is the method's own. dtype "
          f"{start.get('dtype')}; CPU flags: {summary.get('cpu_flags')}; start built in {summary.get('start_s', 0):.0f} s.\n"
          f"Step times: median seconds per optimizer step (PPO: per iteration); peak GB: the training run's peak "
          f"resident memory; zero-std: GRPO/RLOO's mean share of groups whose rewards were all equal (no "
          f"gradient).\nrun: {run_dir}")


def main(args) -> int:
    if args.report:
        report(ROOT / "outputs" / args.report)
        return 0
    start = Start(args)
    setup = {key: getattr(args, key) for key in START_KEYS}
    summary_path = start.dir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else None
    if summary is None or {k: summary["setup"].get(k) for k in START_KEYS} != setup or not start.sft.is_dir():
        import time

        began = time.monotonic()
        metrics = build_start(args, start)
        summary = {"setup": setup, "cpu_flags": cpu_flags(), "start": metrics, "cells": {},
                   "start_s": round(time.monotonic() - began, 1)}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    else:
        print(f"reusing the start of {start.dir}; cells done: {', '.join(summary['cells']) or 'none'}", flush=True)
    if args.transfer and "start" not in summary.get("transfer", {}):
        summary.setdefault("transfer", {})["start"] = finqa_transfer(args, start, "start", start.sft)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for method in args.methods:
        for seed in args.rl_seeds:
            name = f"{method}_seed{seed}"
            done = summary["cells"].get(name)
            if done and done.get("completions", summary["setup"].get("completions")) == args.completions \
                    and not args.rerun:
                continue
            if done:  # another budget: kept beside the new cell, out of the tables
                summary.setdefault("superseded", []).append(done)
            train_s = train(method, args, start, seed)
            cell_dir = start.cell(method, seed)[0]
            module = METHOD_STAGES[method][0]
            final = cell_dir / module / f"ckpt_{method}" / "final"
            end = evaluate(name, final, start.dir, start.common, start.eval_jsonl, args.eval_examples,
                           args.num_samples, **SAMPLE, extra=start.flags)
            manifest = read_json(cell_dir / module / "manifest.json")["metrics"]
            row = {"method": method, "seed": seed, "policy": name, "completions": args.completions,
                   "learning_rate": LEARNING_RATES[method],
                   "flags": [str(f) for f in method_flags(args, method)], "train_s": round(train_s, 1), "end": end,
                   "change": paired_change(start.dir, "start", name, args.seed), "kl": final_kl(cell_dir, method),
                   "peak_rss_gb": manifest.get("peak_rss_gb")}
            if method == "dpo":
                row["pref_acc"] = holdout_pref_ci(cell_dir, args.seed)
            summary["cells"][name] = row
            if args.transfer:
                summary.setdefault("transfer", {})[name] = finqa_transfer(args, start, name, final)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if "rloo" in args.methods and args.task == "format" and "rloo_variance" not in summary:
        summary["rloo_variance"] = rloo_variance(args, start)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.memory:
        summary["float32_peak_rss_gb"] = {method: memory_probe(method, args, start) for method in args.methods}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    report(start.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
