"""Evaluation metrics over scored completions: accuracies, rates, reward means, bootstrap CIs.

    results = [score(text, example, spec) for text, example in zip(completions, examples)]
    metrics = aggregate(results, tokens_generated=1234, wall_time_s=20.5, seed=42)
    metrics["exec_acc"], metrics["exec_acc_ci95"]   # 0.41, [0.32, 0.50]

Names follow DESIGN.md, so metrics.json, summary.csv and validation samples agree:

    exec_acc            official execution accuracy (RewardResult.exec_correct)
    prog_acc            official program accuracy (RewardResult.program_equivalent)
    answer_acc          the answer field states the gold result (RewardResult.answer_correct)
    numeric_acc         within the reward's numeric tolerance, exact hits included
                        (exact_match or numeric_close)
    format_rate         the completion is exactly the JSON object (RewardResult.format_valid)
    valid_program_rate  the predicted program executes (RewardResult.program_valid)
    reward_mean, reward_<component>_mean   weighted reward total and components
    <name>_ci95         [low, high], 95% percentile bootstrap over examples, seeded (rates, reward_mean)
    sampled_<name>      with K sampled completions per prompt (aggregate_samples): the mean over
                        prompts of each prompt's mean over its samples, i.e. the expected score of
                        one sample; sampled_exec_pass_at_k: some sample is exec-correct

Everything here is pure: the same results and seed always give the same dict.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

from utils.finqa_program import equivalent_tokens, execute_tokens, tokenize
from utils.rewards import COMPONENTS, RewardResult, RewardSpec, score

CATEGORIES = ("correct", "numeric_close", "wrong_value", "invalid_program", "format_error")
# metric name -> the per-example fact it averages
RATES = {
    "exec_acc": lambda r: r.exec_correct,
    "prog_acc": lambda r: r.program_equivalent,
    "answer_acc": lambda r: r.answer_correct,
    "numeric_acc": lambda r: r.exact_match or r.numeric_close,
    "format_rate": lambda r: r.format_valid,
    "valid_program_rate": lambda r: r.program_valid,
}


def bootstrap_ci(values, seed: int = 0, n_resamples: int = 1000, level: float = 0.95) -> list[float]:
    """Percentile bootstrap confidence interval of the mean.

    Resamples example indices with replacement from numpy's Generator(PCG64(seed)), so the
    same values and seed always give the same interval (and every metric of one evaluation
    is resampled with the same indices).

    Args:
        values: per-example numbers (bools count as 0/1); for a paired bootstrap, the
            per-item differences (utils.comparison.paired_bootstrap_ci).
        seed: resampling seed.
        n_resamples: bootstrap resamples.
        level: coverage, e.g. 0.95.
    Returns:
        [low, high] as floats; [0.0, 0.0] for no values.
    Example:
        >>> bootstrap_ci([1, 1, 1, 1], seed=0)
        [1.0, 1.0]
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return [0.0, 0.0]
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.Generator(np.random.PCG64(seed))
    indices = rng.integers(0, data.size, size=(n_resamples, data.size))
    means = data[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return [float(low), float(high)]


def _mean(values) -> float:
    values = list(values)
    return float(sum(float(v) for v in values) / len(values)) if values else 0.0


def aggregate(results: list[RewardResult], tokens_generated: int | None = None,
              wall_time_s: float | None = None, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Summarise scored completions with DESIGN.md's metric names.

    Args:
        results: one RewardResult per example (from utils.rewards.score).
        tokens_generated: total generated tokens, if known (None for external predictions).
        wall_time_s: generation wall time, if known.
        seed: bootstrap seed.
        n_resamples: bootstrap resamples; 0 = no `<name>_ci95` keys (cheap, for validation).
    Returns:
        {exec_acc, prog_acc, answer_acc, numeric_acc, format_rate, valid_program_rate,
        reward_mean, reward_exact_mean, reward_numeric_mean, reward_program_mean,
        reward_format_mean, n_examples, tokens_generated, wall_time_s, tokens_per_s,
        and <name>_ci95 for the six rates and reward_mean}. No results gives zeros and n_examples 0.
    Example:
        >>> from utils.rewards import score
        >>> example = {"table": [], "exe_ans": 0.5, "target_program": "divide(1, 2)", "target_answer": "50%"}
        >>> results = [score('{"program": "divide(1, 2)", "answer": "50%"}', example), score("no", example)]
        >>> metrics = aggregate(results, n_resamples=0)
        >>> metrics["exec_acc"], metrics["format_rate"], round(metrics["reward_mean"], 6)
        (0.5, 0.5, 0.55)
    """
    results = list(results)
    metrics = {name: _mean(fact(r) for r in results) for name, fact in RATES.items()}
    metrics["reward_mean"] = _mean(r.total for r in results)
    for component in COMPONENTS:
        metrics[f"reward_{component}_mean"] = _mean(getattr(r, component) for r in results)
    known_rate = (tokens_generated is not None and wall_time_s is not None
                  and wall_time_s > 0 and math.isfinite(wall_time_s))
    metrics.update({
        "n_examples": len(results),
        "tokens_generated": tokens_generated,
        "wall_time_s": wall_time_s,
        "tokens_per_s": tokens_generated / wall_time_s if known_rate else None,
    })
    if n_resamples > 0:
        for name, fact in {**RATES, "reward_mean": lambda r: r.total}.items():
            metrics[f"{name}_ci95"] = bootstrap_ci([fact(r) for r in results], seed, n_resamples)
    return metrics


def aggregate_samples(results_per_prompt: list[list[RewardResult]], seed: int = 0,
                      n_resamples: int = 1000) -> dict:
    """Summarise K sampled completions per prompt: the expected score of one sample, and pass@K.

    Each prompt's K results are averaged first, so every prompt weighs the same and the bootstrap
    resamples prompts (the independent unit), not samples.

    Args:
        results_per_prompt: for each prompt, the RewardResults of its K samples (K >= 1).
        seed, n_resamples: as aggregate(); 0 resamples = no CIs.
    Returns:
        {sampled_<rate> for the six rates, sampled_reward_mean (means over prompts of the per-prompt
        mean over samples), sampled_exec_pass_at_k (prompts with at least one exec-correct sample),
        and sampled_<name>_ci95 for the rates and the reward}.
    Example:
        >>> from utils.rewards import score
        >>> example = {"table": [], "exe_ans": 0.5, "target_program": "divide(1, 2)", "target_answer": "50%"}
        >>> right, wrong = (score(t, example) for t in ('{"program": "divide(1, 2)", "answer": "50%"}', "no"))
        >>> m = aggregate_samples([[right, wrong, wrong, wrong], [wrong] * 4], n_resamples=0)
        >>> m["sampled_exec_acc"], m["sampled_exec_pass_at_k"]
        (0.125, 0.5)
    """
    facts = {**RATES, "reward_mean": lambda r: r.total}
    per_prompt = {name: [_mean(fact(r) for r in results) for results in results_per_prompt]
                  for name, fact in facts.items()}
    metrics = {f"sampled_{name}": _mean(values) for name, values in per_prompt.items()}
    metrics["sampled_exec_pass_at_k"] = _mean(any(r.exec_correct for r in results) for results in results_per_prompt)
    if n_resamples > 0:
        for name, values in per_prompt.items():
            metrics[f"sampled_{name}_ci95"] = bootstrap_ci(values, seed, n_resamples)
    return metrics


def failure_counts(results: list[RewardResult]) -> dict[str, int]:
    """Examples per category (every known category listed, in a fixed order, zeros included).

    Example:
        >>> from utils.rewards import score
        >>> example = {"table": [], "exe_ans": 0.5, "target_program": "divide(1, 2)", "target_answer": "50%"}
        >>> failure_counts([score("no", example)])["format_error"]
        1
    """
    counts = dict.fromkeys(CATEGORIES, 0)
    for result in results:
        counts[result.category] = counts.get(result.category, 0) + 1
    return counts


def format_table(metrics: dict) -> str:
    """The six rates and reward_mean of a metrics dict as an aligned text table (CIs if present),
    with the sampled means beside them when the metrics have them.

    Example:
        >>> print(format_table({**dict.fromkeys(RATES, 0.5), "reward_mean": 0.25}).splitlines()[1])
        exec_acc               0.5000
    """
    sampled = "sampled_reward_mean" in metrics
    lines = [f"{'metric':<20} {'greedy':>8}   95% CI" + (f"{'':<13}{'sampled':>8}   95% CI" if sampled else "")]
    for name in (*RATES, "reward_mean"):
        line = f"{name:<20} {metrics[name]:>8.4f}" + _ci_text(metrics.get(f"{name}_ci95"))
        if sampled:
            line = f"{line:<49} {metrics[f'sampled_{name}']:>8.4f}" + _ci_text(metrics.get(f"sampled_{name}_ci95"))
        lines.append(line)
    if sampled:
        lines.append(f"{'exec pass@k':<20} {'':>8}{'':<21} {metrics['sampled_exec_pass_at_k']:>8.4f}")
    return "\n".join(lines)


def _ci_text(ci) -> str:
    return f"   [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


# --- official FinQA predictions ------------------------------------------------------------

def tokens_to_program(tokens: list[str]) -> str:
    """An official token list back into a program string (a trailing "EOF" dropped).

    Example:
        >>> tokens_to_program(["subtract(", "5", "3", ")", "divide(", "#0", "3", ")", "EOF"])
        'subtract(5, 3), divide(#0, 3)'
    """
    text, previous = "", None
    for token in (tokens[:-1] if tokens and tokens[-1] == "EOF" else tokens):
        joins = previous is None or previous.endswith("(") or token == ")"
        text += token if joins else ", " + token
        previous = token
    return text


def score_official(tokens: list[str], example: dict, spec: RewardSpec = RewardSpec()) -> tuple[str, RewardResult]:
    """Score a prediction in FinQA's official format (`"predicted": [tokens..., "EOF"]`).

    exec_correct and program_equivalent come from the token list itself, as the official
    evaluate.py computes them (execute_tokens == exe_ans, equivalent_tokens with the tokenized
    gold), so exec_acc/prog_acc match it exactly. The other facts and the reward score the
    completion `{"program": <tokens joined>, "answer": ""}`.

    Returns:
        (that completion text, RewardResult).
    Example:
        >>> example = {"table": [], "exe_ans": 0.5, "target_program": "divide(1, 2)", "target_answer": "50%"}
        >>> text, result = score_official(["divide(", "1", "2", ")", "EOF"], example)
        >>> text, result.exec_correct, result.program_equivalent
        ('{"program": "divide(1, 2)", "answer": ""}', True, True)
    """
    completion = json.dumps({"program": tokens_to_program(tokens), "answer": ""})
    value = execute_tokens(tokens, example.get("table") or [])
    gold_tokens = tokenize(str(example.get("target_program") or ""))
    return completion, replace(score(completion, example, spec),
                               exec_correct=value is not None and value == example.get("exe_ans"),
                               program_equivalent=equivalent_tokens(tokens, gold_tokens))
