"""Cross-policy comparison: paired statistics and the tables of 11_compare_runs.py.

    low, high = paired_bootstrap_ci(grpo_correct, sft_correct, seed=42, n_resamples=2000)
    b, c, p = mcnemar(grpo_correct, sft_correct)     # b: only grpo right, c: only sft right
    mean, std = mean_std([0.41, 0.45, 0.43])         # sample std (n - 1)
    seeds_table(summary), paired_row(...), conclusions(...), report_markdown(...), to_csv(rows, columns)

Everything here is pure (no I/O, no globals, no unseeded randomness): the same inputs give the
same tables. A paired comparison is on the per-item sampled exec_acc means (paired_on "sampled mean
of K=4") when the policy and the baseline both have them, else on greedy exec_correct (paired_on
"greedy"); McNemar is always on greedy exec_correct. A greedy difference counts as significant only
when both the paired bootstrap CI excludes 0 and McNemar's p < 0.05; a sampled one when its paired
bootstrap CI excludes 0 (McNemar tests the greedy 0/1 pairs, another quantity: reported, not required).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np

from utils.metrics import bootstrap_ci

METHODS = ("base", "sft", "ppo", "grpo", "rloo", "dpo")
# policy names as 10_evaluate.py derives them, plus a seed suffix: grpo, grpo_seed2, grpo-s2, grpo_step_50
POLICY_PATTERN = re.compile(r"(?P<method>[a-z]+?)(?:[_-](?:seed|s)(?P<seed>\d+))?(?:[_-].*)?", re.IGNORECASE)
EXACT_BELOW = 25   # McNemar: exact binomial test below this many discordant pairs, else chi-square
ALPHA = 0.05
SMALL_N = 100      # fewer test items than this: say the comparison is underpowered
FEW_SEEDS = 3
LOG_LISTS = ("log_history", "entries", "steps", "history", "logs")  # where a JSON log dict keeps its entries
SEED_METRICS = ("exec_acc", "prog_acc", "format_rate", "reward_mean")
RATES = ("exec_acc", "prog_acc", "answer_acc", "numeric_acc", "format_rate", "valid_program_rate")
# 10_evaluate.py --num_samples K: its sampling settings (num_samples 0: greedy only) and sampled metrics (means
# over prompts of the per-prompt mean over K samples; pass@k: share of prompts with an exec-correct sample)
# Where a newcomer whose methods all tie (the main job's --quick_test) looks next: the benchmark that
# shows whether each method learns at all, and what it costs (README, Benchmarks)
LEARNABILITY_HINT = ("a small comparison on accuracy is `python 12_driver.py --recipe ladder_cpu` (every method from "
                     "one SFT start on the synthetic ladder's one-step questions, exec_acc with paired CIs against "
                     "SFT; about 35 min on 2 CPU cores with native bf16, 70 on AVX2-only ones, estimated), the full study `python tests/benchmarks/bench_learnability.py "
                     "--task ladder` (three RL seeds per method)")
SAMPLING = ("num_samples", "sample_temperature", "sample_top_p")
SAMPLED = ("sampled_exec_acc", "sampled_format_rate", "sampled_reward_mean", "sampled_exec_pass_at_k")
SUMMARY_COLUMNS = ["run", "policy", "method", "seed", "model", "context_mode", "dataset_source", "n", "exec_acc",
                   "exec_acc_ci_low", "exec_acc_ci_high", *RATES[1:], "reward_mean", *SAMPLING, SAMPLED[0],
                   "sampled_exec_acc_ci_low", "sampled_exec_acc_ci_high", *SAMPLED[1:], "train_wall_time_s",
                   "train_tokens", "eval_tokens", "compute_device", "compute_hours", "peak_memory_gb"]
GREEDY = "greedy"  # paired_on of a comparison of greedy exec_correct


# --- statistics ---

def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 denominator).

    Args:
        values: numbers (None entries are skipped).
    Returns:
        (mean, std); std is None for fewer than two values, both None for none.
    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    data = [float(v) for v in values if v is not None]
    if not data:
        return None, None
    mean = sum(data) / len(data)
    if len(data) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in data) / (len(data) - 1))


def paired_bootstrap_ci(a, b, seed: int = 0, n_resamples: int = 2000, level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of mean(a) - mean(b) over paired items.

    `utils.metrics.bootstrap_ci` of the per-item differences a - b: resampling item indices
    (numpy Generator(PCG64(seed))) resamples a and b together, so the pairing is kept.

    Args:
        a, b: per-item values of the same items in the same order (bools count as 0/1).
        seed: resampling seed.
        n_resamples: bootstrap resamples.
        level: coverage, e.g. 0.95.
    Returns:
        [low, high]; [d, d] when every pair differs by the same d; [0.0, 0.0] for no items.
    Example:
        >>> paired_bootstrap_ci([1, 1, 1], [0, 0, 0], seed=0)
        [1.0, 1.0]
    """
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_ci: a has {len(a)} items, b has {len(b)}: pair them by id first")
    return bootstrap_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), seed, n_resamples, level)


def mcnemar_p(b: int, c: int) -> tuple[float, str]:
    """Two-sided McNemar p-value from the discordant counts.

    Exact binomial test (p = 2 * P[X <= min(b, c)], X ~ Bin(b + c, 1/2), capped at 1) when
    b + c < 25; otherwise chi-square with continuity correction, (|b - c| - 1)^2 / (b + c) on
    1 degree of freedom, whose survival function is erfc(sqrt(x / 2)).

    Returns:
        (p, "exact" | "chi2"); (1.0, "exact") when there are no discordant pairs.
    Example:
        >>> round(mcnemar_p(10, 2)[0], 5)
        0.03857
    """
    n = b + c
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
        return min(1.0, 2.0 * tail), "exact"
    statistic = max(abs(b - c) - 1, 0) ** 2 / n  # b == c gives 0, p = 1
    return math.erfc(math.sqrt(statistic / 2.0)), "chi2"


def mcnemar(a_correct, b_correct) -> tuple[int, int, float]:
    """McNemar's test of two classifiers on the same items.

    Args:
        a_correct, b_correct: per-item correctness of A and B, same items in the same order.
    Returns:
        (b, c, p): b = items only A gets right, c = items only B gets right, two-sided p.
    Example:
        >>> mcnemar([1, 1, 0, 1], [1, 0, 0, 1])
        (1, 0, 1.0)
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"mcnemar: {len(a_correct)} vs {len(b_correct)} items: pair them by id first")
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    return b, c, mcnemar_p(b, c)[0]


# --- names ---

def parse_policy_name(name: str) -> tuple[str, int | None]:
    """(method, seed from the name or None): grpo_seed2 -> ("grpo", 2), sft -> ("sft", None).

    Example:
        >>> parse_policy_name("grpo-s2"), parse_policy_name("dpo_step_50"), parse_policy_name("finqanet")
        (('grpo', 2), ('dpo', None), ('finqanet', None))
    """
    match = POLICY_PATTERN.fullmatch(name)
    if not match or match["method"].lower() not in METHODS:
        return name, None
    return match["method"].lower(), int(match["seed"]) if match["seed"] else None


def parse_training_log(text: str) -> list[dict]:
    """Per-step entries of a training log: a JSON list, a dict holding one (TRL's log_history), or JSON lines.

    Raises:
        ValueError: the text is neither JSON nor JSON lines.
    Example:
        >>> parse_training_log('{"log_history": [{"step": 1, "reward": 0.5}]}')
        [{'step': 1, 'reward': 0.5}]
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"invalid JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(data, dict):
        lists = [data[k] for k in LOG_LISTS if isinstance(data.get(k), list)]
        data = lists[0] if lists else next((v for v in data.values() if isinstance(v, list)), [])
    return [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []


def tokens_from_log(entries: list[dict]) -> float | None:
    """Training tokens a log records: TRL's cumulative num_tokens (its last value), else the sum over
    steps of train/tokens_per_s x time/step_s (05_train_ppo's rollout tokens); None when neither.

    Example:
        >>> tokens_from_log([{"step": 1, "train/tokens_per_s": 50.0, "time/step_s": 2.0}] * 3)
        300.0
    """
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    counts = [e["num_tokens"] for e in entries if number(e.get("num_tokens"))]
    if counts:
        return counts[-1]
    steps = [e["train/tokens_per_s"] * e["time/step_s"] for e in entries
             if number(e.get("train/tokens_per_s")) and number(e.get("time/step_s"))]
    return sum(steps) if steps else None


# --- tables ---

def seeds_table(summary: list[dict]) -> list[dict]:
    """One row per method: seeds, and mean/std across its policies of SEED_METRICS."""
    rows = []
    for method in dict.fromkeys(row["method"] for row in summary):
        group = [row for row in summary if row["method"] == method]
        row = {"method": method, "n_policies": len(group),
               "seeds": ";".join(str(r["seed"]) for r in group), "n": ";".join(str(r["n"]) for r in group)}
        for name in SEED_METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(r[name] for r in group)
        rows.append(row)
    return rows


# exec_acc, baseline_exec_acc, diff and its CI are of the paired_on quantity; the rest is greedy (McNemar)
PAIRED_COLUMNS = ["policy", "method", "seed", "baseline", "n_paired", "paired_on", "exec_acc", "baseline_exec_acc",
                  "diff", "diff_ci_low", "diff_ci_high", "greedy_exec_acc", "baseline_greedy_exec_acc",
                  "only_policy_correct", "only_baseline_correct", "mcnemar_test", "mcnemar_p", "significant"]


def sampled_label(k, base_k) -> str:
    """paired_on of a comparison of sampled means: K of the policy, and of the baseline when it differs.

    Example:
        >>> sampled_label(4, 4), sampled_label(8, 4)
        ('sampled mean of K=4', 'sampled mean of K=8 (baseline K=4)')
    """
    return f"sampled mean of K={k}" + (f" (baseline K={base_k})" if base_k != k else "")


def average(values) -> float | None:
    """Mean of numbers (bools count as 0/1); None for none."""
    return sum(map(float, values)) / len(values) if len(values) else None


def paired_row(policy: dict, baseline: dict, ids: list, correct: list, base_correct: list, seed: int,
               n_resamples: int, values: list | None = None, base_values: list | None = None,
               paired_on: str = GREEDY) -> dict:
    """One paired comparison of a policy against the baseline on shared item ids.

    Args:
        policy, baseline: summary rows (label, method, seed).
        ids: the shared item ids.
        correct, base_correct: greedy exec_correct per item (McNemar, greedy_exec_acc).
        values, base_values: the per-item quantity paired (exec_acc, diff, its CI): default the greedy one.
        paired_on: what values are, GREEDY or sampled_label(...); sets the significance rule.
    Returns:
        A row of PAIRED_COLUMNS; significant = CI excludes 0, and for GREEDY also McNemar p < ALPHA.
    """
    values, base_values = (correct, base_correct) if values is None else (values, base_values)
    difference = (sum(map(float, values)) - sum(map(float, base_values))) / len(ids) if ids else None
    low, high = paired_bootstrap_ci(values, base_values, seed, n_resamples)
    b, c, _ = mcnemar(correct, base_correct)
    p, test = mcnemar_p(b, c)
    return {"policy": policy["label"], "method": policy["method"], "seed": policy["seed"],
            "baseline": baseline["label"], "n_paired": len(ids), "paired_on": paired_on,
            "exec_acc": average(values), "baseline_exec_acc": average(base_values),
            "diff": difference, "diff_ci_low": low, "diff_ci_high": high,
            "greedy_exec_acc": average(correct), "baseline_greedy_exec_acc": average(base_correct),
            "only_policy_correct": b, "only_baseline_correct": c, "mcnemar_test": test, "mcnemar_p": p,
            "significant": bool(ids) and (low > 0 or high < 0) and (paired_on != GREEDY or p < ALPHA)}


def fmt(value, digits: int = 3) -> str:
    """A cell for markdown: floats to `digits` places, None as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str], digits: int = 3) -> str:
    """rows as a GitHub markdown table of the given columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(col), digits) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def conclusions(summary: list[dict], seeds: list[dict], paired: list[dict], baseline: str | None) -> list[str]:
    """Plain-language findings, each backed by a number in the tables and no stronger than it."""
    out = []
    ranked = sorted((r for r in seeds if r["exec_acc_mean"] is not None), key=lambda r: -r["exec_acc_mean"])
    if not ranked:
        return ["No policy has an exec_acc: nothing to compare."]
    best = ranked[0]
    ties = [r["method"] for r in ranked[1:] if r["exec_acc_mean"] == best["exec_acc_mean"]]
    if len(ties) == len(ranked) - 1 > 0:  # no ranking to report: "best: base, tied with all" would read as one
        out.append(f"No method stands out: every method has exec_acc {fmt(best['exec_acc_mean'])}"
                   + (" (no test item solved; a smoke-sized run such as --quick_test is expected to end here)"
                      if best["exec_acc_mean"] == 0 else "") + f"; {LEARNABILITY_HINT}.")
    else:
        out.append(f"Best method by exec_acc: **{best['method']}** ({fmt(best['exec_acc_mean'])}"
                   + (f", mean of {best['n_policies']} seeds" if best["n_policies"] > 1 else "") + ")"
                   + (f", tied with {', '.join(ties)}" if ties else "") + ".")
    if baseline is None:
        out.append("No baseline policy was found: no paired comparison.")
    elif best["method"] == next((r["method"] for r in summary if r["label"] == baseline), None) and not ties:
        out.append(f"The baseline ({baseline}) has the highest exec_acc: no method improves on it here.")
    if sampled := [r for r in summary if r.get("num_samples")]:
        greedy_only = [r["label"] for r in summary if not r.get("num_samples")]
        out.append("Sampled evaluation (exec_acc averaged over each item's K sampled completions): "
                   + ", ".join(f"{r['label']} {fmt(r['sampled_exec_acc'])} (K={r['num_samples']})" for r in sampled)
                   + "; greedy only: " + (", ".join(greedy_only) or "none") + ".")
    for row in (r for r in paired if r["method"] == best["method"] and r["policy"] != baseline):
        verdict = "significant" if row["significant"] else "not significant"
        greedy = "" if row["paired_on"] == GREEDY else "greedy "
        out.append(f"{row['policy']} vs {baseline} ({row['paired_on']}): exec_acc difference {row['diff']:+.3f} "
                   f"(95% paired bootstrap CI [{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}], {greedy}McNemar "
                   f"{row['mcnemar_test']} p = {row['mcnemar_p']:.3g}, {row['n_paired']} items): {verdict}.")
    winners = [r["policy"] for r in paired if r["significant"] and r["diff"] > 0]
    losers = [r["policy"] for r in paired if r["significant"] and r["diff"] < 0]
    if paired:
        rule = "CI excludes 0, and p < 0.05 when paired on greedy" if any(r["paired_on"] != GREEDY for r in paired) \
            else "CI excludes 0 and p < 0.05"
        out.append(f"Significantly above the baseline ({rule}): "
                   + (", ".join(winners) or "none") + "; significantly below: " + (", ".join(losers) or "none") + ".")
    n_min = min(r["n"] for r in summary)
    if n_min < SMALL_N:
        half = 1.96 * math.sqrt(0.25 / n_min)
        out.append(f"Underpowered: only {n_min} test items (< {SMALL_N}); a single accuracy's 95% CI is up to "
                   f"±{half:.2f} wide, so only large differences can be detected.")
    multi = [r for r in seeds if r["n_policies"] > 1]
    for row in multi:
        out.append(f"Stability of {row['method']}: exec_acc {fmt(row['exec_acc_mean'])} ± "
                   f"{fmt(row['exec_acc_std'])} (sample std over {row['n_policies']} seeds).")
    if max(r["n_policies"] for r in seeds) < FEW_SEEDS:
        counts = ", ".join(f"{r['method']}: {r['n_policies']}" for r in seeds)
        out.append(f"Underpowered across seeds: fewer than {FEW_SEEDS} seeds per method ({counts}), so "
                   "seed-to-seed variance is not estimated reliably and rankings may change with more seeds.")
    costed = [r for r in summary if r.get("compute_hours")]
    if costed and not any(r["exec_acc"] for r in costed):
        out.append("Efficiency: no trained policy solves a test item, so exec_acc per compute hour is 0 for all.")
    elif costed:
        eff = max(costed, key=lambda r: r["exec_acc"] / r["compute_hours"])
        devices = sorted({str(r["compute_device"]) for r in costed})
        out.append(f"Efficiency: {eff['label']} gives the most exec_acc per training compute hour "
                   f"({eff['exec_acc'] / eff['compute_hours']:.3g} per hour on {eff['compute_device']}); compute "
                   "counts each policy's own training stage only (RL stages also build on the SFT run)."
                   + (f" Devices differ ({', '.join(devices)}): their hours are not directly comparable."
                      if len(devices) > 1 else ""))
    else:
        out.append("Efficiency: no training manifests with durations were found, so compute is not compared.")
    if len({r.get("data_sha256") for r in summary}) > 1:
        out.append("Caution: the policies were not all evaluated on the same data file; the summary rows are "
                   "not directly comparable (paired tests use only the shared item ids).")
    if any(r["context_mode"] == "gold" for r in summary):
        out.append("Some policies use the gold (oracle) context: their scores are upper bounds, not comparable "
                   "to retrieved-context results.")
    return out


# --- files ---

def to_csv(rows: list[dict], columns: list[str]) -> str:
    """rows as CSV text; None is an empty cell and floats keep every digit (str(float) round-trips)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_markdown(summary: list[dict], seeds: list[dict], paired: list[dict], baseline: str | None,
                    notes: list[str], plot_names: list[str], inputs: list[tuple[str, str]], resamples: int,
                    seed: int) -> str:
    """report.md: run(s), summary, seed and paired tables, plots (plots/<name>.png), conclusions, inputs."""
    shown = [{**r, "exec_acc 95% CI": f"[{fmt(r['exec_acc_ci_low'])}, {fmt(r['exec_acc_ci_high'])}]"}
             for r in summary]
    sampled = any(r.get("num_samples") for r in summary)
    columns = ["label", "method", "seed", "model", "context_mode", "dataset_source", "n", "exec_acc",
               "exec_acc 95% CI", *RATES[1:], "reward_mean", *(("num_samples", *SAMPLED) if sampled else ()),
               "compute_hours", "compute_device"]
    seed_columns = ["method", "n_policies", "seeds", *[f"{m}_{s}" for m in SEED_METRICS for s in ("mean", "std")]]
    on = list(dict.fromkeys(r["paired_on"] for r in paired))
    paired_columns = ["policy", "n_paired", "paired_on", "exec_acc", "baseline_exec_acc", "diff", "diff_ci_low",
                      "diff_ci_high", *(("greedy_exec_acc", "baseline_greedy_exec_acc") if on != [GREEDY] else ()),
                      "only_policy_correct", "only_baseline_correct", "mcnemar_test", "mcnemar_p", "significant"]
    run_names = ", ".join(sorted({str(r["run"]) for r in summary}))
    parts = [f"# Policy comparison: {run_names}", "",
             f"Runs: {run_names}. Baseline: {baseline or 'none'}. Paired bootstrap: {resamples} resamples, "
             f"seed {seed}. Full-precision numbers: summary.csv, seeds_summary.csv, paired.csv.", "",
             "## Summary", "", markdown_table(shown, columns), "",
             "compute_hours = training wall time x devices of the policy's own training stage (GPU-hours on "
             "GPUs, process-hours on CPU: see compute_device); RL policies also depend on the SFT run. "
             "summary.csv's train_tokens is what the stage logged (TRL's num_tokens; 05_ppo: rollout tokens), "
             "so compare it within a method only.", "",
             "## Across seeds (mean and sample std)", "", markdown_table(seeds, seed_columns), "",
             f"## Paired comparison against {baseline or 'the baseline'} "
             f"(exec_acc paired on {' / '.join(on) or GREEDY}, same test items)", "",
             markdown_table(paired, paired_columns) if paired else "No paired comparison (see the warnings).", "",
             "paired_on = the per-item quantity paired: greedy = the greedy completion's exec_correct (0/1); "
             "sampled mean of K = the item's mean exec_correct over its K sampled completions (10_evaluate.py "
             "--num_samples K), used when the policy and the baseline both have it for every shared item. "
             "exec_acc, baseline_exec_acc, diff and its CI are of that quantity; McNemar (only_policy_correct, "
             "only_baseline_correct) is always on greedy exec_correct (paired.csv: greedy_exec_acc, "
             "baseline_greedy_exec_acc).",
             "", "significant = paired on greedy: the 95% paired bootstrap CI of the difference excludes 0 and "
             f"McNemar p < 0.05 (exact binomial test below {EXACT_BELOW} discordant pairs, else chi-square with "
             "continuity correction); paired on sampled means: the 95% paired bootstrap CI of the difference "
             "excludes 0 (McNemar, a test of the greedy 0/1 pairs, is reported beside but not required).", "",
             "## Plots", "", *[f"![{name}](plots/{name}.png)" for name in plot_names], "",
             "## Conclusions", "", *[f"- {line}" for line in notes], "", "## Inputs", "",
             *[f"- `{path}` sha256 `{digest}`" for path, digest in inputs]]
    return "\n".join(parts) + "\n"
