"""11_compare_runs.py and utils/comparison.py: paired statistics by hand, and the script on fixture policies.

Fixtures (tests/fixtures/compare/run_cmp, 30 test items cmp-00..cmp-29):
    base        right on items 0-1                      (2/30)
    sft         right on items 0-9                      (10/30), trained in 03_sft (seed 42, 1800 s, cpu)
    grpo_seed1  right on items 2-21: b=12, c=2 vs sft   (20/30), 06_grpo_seed1 (3600 s on 2 GPUs)
    grpo-s2     right on items 0-7, 10-17: b=8, c=2     (16/30), 06_grpo_seed2 (5400 s, cpu)
Checkpoint paths in the metrics are relative to the repository root, so the script runs from there.
The fixtures are greedy-only in the old format (no num_samples, no sampled_* columns); `sampled_run` rewrites a
copy as 10_evaluate.py --num_samples K writes it (SAMPLED_MEANS: each item's sampled_exec_acc).
"""
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.comparison import (mcnemar, mcnemar_p, mean_std, paired_bootstrap_ci, paired_row, parse_policy_name,
                              parse_training_log, tokens_from_log)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "compare" / "run_cmp"
METRICS_GLOB = "tests/fixtures/compare/run_cmp/10_evaluation/*/metrics.json"
POLICIES = ("base", "sft", "grpo_seed1", "grpo-s2")
PLOTS = ("reward_vs_method", "efficiency_vs_quality", "training_curves", "score_vs_seed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return subprocess.run([sys.executable, "11_compare_runs.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def read_csv(path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {row.get("policy") or row.get("method"): row for row in rows}


# --- statistics, by hand ---

@pytest.mark.parametrize("b, c, expected, test", [
    (10, 2, 2 * (1 + 12 + 66) / 2 ** 12, "exact"),   # 2 * P[Bin(12, 1/2) <= 2] = 0.03857
    (2, 10, 2 * (1 + 12 + 66) / 2 ** 12, "exact"),   # symmetric in b and c
    (12, 2, 2 * (1 + 14 + 91) / 2 ** 14, "exact"),   # 0.01294, the grpo_seed1 fixture
    (5, 5, 1.0, "exact"),                            # b = c: no evidence, p = 1 (2 * tail > 1 is capped)
    (0, 0, 1.0, "exact"),                            # no discordant pairs
    (0, 1, 1.0, "exact"),                            # 2 * P[X <= 0] = 2 * 1/2 = 1
    (20, 20, 1.0, "chi2"),                           # b = c with the chi-square: statistic 0, p = 1
    (30, 10, math.erfc(math.sqrt(9.025 / 2)), "chi2"),  # (|30 - 10| - 1)^2 / 40 = 9.025 -> p = 0.00266
    (24, 0, 2 / 2 ** 24, "exact"),                   # b + c = 24 < 25: still exact
    (25, 0, math.erfc(math.sqrt(24 ** 2 / 25 / 2)), "chi2"),  # b + c = 25: chi-square, (25 - 1)^2 / 25
])
def test_mcnemar_p(b, c, expected, test):
    p, used = mcnemar_p(b, c)
    assert used == test
    assert p == pytest.approx(expected, rel=1e-12)


def test_mcnemar_known_values():
    assert mcnemar_p(10, 2)[0] == pytest.approx(0.03857, abs=1e-5)   # the textbook example
    assert mcnemar_p(30, 10)[0] == pytest.approx(0.002663, abs=1e-6)  # chi2(1) survival at 9.025


def test_mcnemar_counts_discordant_pairs():
    a = [1, 1, 1, 0, 0, 1, 0]   # A right on items 0, 1, 2, 5
    b = [1, 0, 0, 1, 0, 1, 0]   # B right on items 0, 3, 5
    assert mcnemar(a, b) == (2, 1, 1.0)   # only A: items 1, 2; only B: item 3; 2 * P[Bin(3) <= 1] = 1
    with pytest.raises(ValueError, match="pair them by id"):
        mcnemar([1, 0], [1])


@pytest.mark.parametrize("a, b, d", [
    ([1] * 20, [0] * 20, 1.0),      # every pair differs by +1
    ([0] * 20, [1] * 20, -1.0),     # every pair differs by -1
    ([1, 0, 1, 1] * 5, [1, 0, 1, 1] * 5, 0.0),  # identical predictions
])
def test_paired_bootstrap_constant_difference(a, b, d):
    assert paired_bootstrap_ci(a, b, seed=0, n_resamples=500) == [d, d]


def test_paired_bootstrap_contains_difference_and_is_seeded():
    a = [1] * 30 + [0] * 20     # 60% right
    b = [1] * 20 + [0] * 30     # 40% right, same items: true difference 0.2
    low, high = paired_bootstrap_ci(a, b, seed=7, n_resamples=2000)
    assert low < 0.2 < high
    assert 0.0 < low and high < 0.4  # 10 discordant pairs all favouring a: the interval is positive
    assert paired_bootstrap_ci(a, b, seed=7, n_resamples=2000) == [low, high]
    assert paired_bootstrap_ci([], [], seed=0) == [0.0, 0.0]
    with pytest.raises(ValueError, match="pair them by id"):
        paired_bootstrap_ci([1, 0], [1], seed=0)


@pytest.mark.parametrize("values, mean, std", [
    ([0.5, 0.7], 0.6, math.sqrt(0.02)),           # deviations +-0.1: (0.01 + 0.01) / (2 - 1)
    ([1, 2, 3, 4], 2.5, math.sqrt(5 / 3)),        # (2.25 + 0.25 + 0.25 + 2.25) / 3
    ([0.3, None, 0.3], 0.3, 0.0),                 # None is skipped
    ([0.4], 0.4, None),                           # one seed: no spread
    ([], None, None),
])
def test_mean_std(values, mean, std):
    got_mean, got_std = mean_std(values)
    assert got_mean == pytest.approx(mean) if mean is not None else got_mean is None
    assert got_std == pytest.approx(std) if std is not None else got_std is None


@pytest.mark.parametrize("name, expected", [
    ("sft", ("sft", None)),
    ("grpo_seed2", ("grpo", 2)),
    ("grpo-s2", ("grpo", 2)),
    ("RLOO_seed10", ("rloo", 10)),
    ("dpo_step_50", ("dpo", None)),       # 10_evaluate names a step checkpoint this way
    ("finqanet", ("finqanet", None)),     # outside predictions: the name is the method
])
def test_parse_policy_name(name, expected):
    assert parse_policy_name(name) == expected


@pytest.mark.parametrize("text, steps", [
    ('[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]', [1, 2]),        # TRL log_history as a list
    ('{"log_history": [{"step": 5, "reward": 0.1}], "best": 3}', [5]),        # a dict holding it
    ('{"step": 1, "kl": 0.0}\n{"step": 2, "kl": 0.1}\n', [1, 2]),            # JSON lines
    ('{"config": {}}', []),                                                  # no entries
])
def test_parse_training_log(text, steps):
    assert [entry["step"] for entry in parse_training_log(text)] == steps


@pytest.mark.parametrize("entries, tokens", [
    ([{"step": 1, "num_tokens": 100}, {"step": 2, "num_tokens": 250}], 250),           # TRL: cumulative, last
    ([{"train/tokens_per_s": 40.0, "time/step_s": 2.5},                                 # 05_ppo: 40 x 2.5
      {"train/tokens_per_s": 10.0, "time/step_s": 1.0}], 110.0),                         # + 10 x 1
    ([{"step": 1, "loss": 1.0}, {"train/tokens_per_s": float("nan"), "time/step_s": 1.0}], None),  # nothing usable
])
def test_tokens_from_log(entries, tokens):
    assert tokens_from_log(entries) == tokens


def test_paired_row_significance_depends_on_what_is_paired():
    """Sampled means: the CI alone decides; greedy: the CI and McNemar (here p = 1: no discordant pair)."""
    row = {"label": "grpo", "method": "grpo", "seed": 1}
    ids = list(range(20))
    correct = [True, False] * 10                           # greedy: identical on both sides
    values, base_values = [0.75, 0.5] * 10, [0.5, 0.25] * 10  # every item's sampled mean 0.25 higher
    sampled = paired_row(row, {**row, "label": "sft"}, ids, correct, correct, 0, 200, values, base_values,
                         "sampled mean of K=4")
    assert (sampled["paired_on"], sampled["exec_acc"], sampled["baseline_exec_acc"]) == \
        ("sampled mean of K=4", 0.625, 0.375)
    assert sampled["diff"] == 0.25 and [sampled["diff_ci_low"], sampled["diff_ci_high"]] == [0.25, 0.25]
    assert (sampled["greedy_exec_acc"], sampled["baseline_greedy_exec_acc"], sampled["mcnemar_p"]) == (0.5, 0.5, 1.0)
    assert sampled["significant"] is True                  # CI [0.25, 0.25] excludes 0; McNemar not required
    greedy = paired_row(row, {**row, "label": "sft"}, ids, correct, correct, 0, 200)
    assert (greedy["paired_on"], greedy["diff"], greedy["significant"]) == ("greedy", 0.0, False)
    ci_only = paired_row(row, {**row, "label": "sft"}, ids, [True] * 20, [False] * 20, 0, 200)  # b = 20: p < 0.05
    assert ci_only["significant"] is True and ci_only["exec_acc"] == ci_only["greedy_exec_acc"] == 1.0


def test_parse_training_log_rejects_garbage():
    with pytest.raises(ValueError, match="invalid JSON"):
        parse_training_log("{not json")


# --- the script on the fixtures ---

@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    done = run(METRICS_GLOB, "--output_dir", out, "--bootstrap", 1000)
    assert done.returncode == 0, done.stderr
    return out


def test_summary_numbers_equal_metrics(compared):
    summary = read_csv(compared / "summary.csv")
    assert set(summary) == set(POLICIES)
    for policy in POLICIES:
        metrics = json.loads((FIXTURE / "10_evaluation" / policy / "metrics.json").read_text())
        row = summary[policy]
        for name in ("exec_acc", "prog_acc", "answer_acc", "numeric_acc", "format_rate", "valid_program_rate",
                     "reward_mean"):
            assert float(row[name]) == metrics[name], (policy, name)   # exact: no rounding
        assert [float(row["exec_acc_ci_low"]), float(row["exec_acc_ci_high"])] == metrics["exec_acc_ci95"]
        assert int(row["n"]) == metrics["n_examples"] and int(row["eval_tokens"]) == metrics["tokens_generated"]
        assert (row["run"], row["model"], row["context_mode"], row["dataset_source"]) == \
            ("run_cmp", "smollm2-135m", "retrieved", "finqa")
        assert row["num_samples"] == "0" and row["sampled_exec_acc"] == row["sampled_reward_mean"] == ""  # old files


def test_summary_methods_seeds_and_compute(compared):
    summary = read_csv(compared / "summary.csv")
    facts = {p: (summary[p]["method"], summary[p]["seed"]) for p in POLICIES}
    assert facts == {"base": ("base", "42"), "sft": ("sft", "42"),   # sft: the training manifest's seed
                     "grpo_seed1": ("grpo", "1"), "grpo-s2": ("grpo", "2")}   # from the names
    assert float(summary["sft"]["compute_hours"]) == 0.5                # 1800 s x 1 cpu
    assert float(summary["grpo_seed1"]["compute_hours"]) == 2.0         # 3600 s x 2 GPUs
    assert float(summary["grpo-s2"]["compute_hours"]) == 1.5            # 5400 s x 1 cpu
    assert float(summary["base"]["compute_hours"]) == 0.0               # not trained here
    assert summary["grpo_seed1"]["compute_device"] == "cuda:NVIDIA H100 80GB HBM3 x2"
    assert int(summary["sft"]["train_tokens"]) == 123456
    assert float(summary["sft"]["peak_memory_gb"]) == 1.75
    assert float(summary["grpo_seed1"]["peak_memory_gb"]) == 30.0       # 30720 MB
    assert summary["grpo-s2"]["peak_memory_gb"] == ""                   # not logged: empty, not 0


def test_seeds_summary(compared):
    seeds = read_csv(compared / "seeds_summary.csv")
    assert seeds["grpo"]["n_policies"] == "2" and seeds["sft"]["n_policies"] == "1"
    assert float(seeds["grpo"]["exec_acc_mean"]) == pytest.approx((20 / 30 + 16 / 30) / 2)   # 0.6
    assert float(seeds["grpo"]["exec_acc_std"]) == pytest.approx(math.sqrt(2 * (2 / 30) ** 2))  # 0.0943
    assert seeds["sft"]["exec_acc_std"] == ""   # one seed: no std


def test_paired_against_sft(compared):
    paired = read_csv(compared / "paired.csv")
    assert set(paired) == {"base", "grpo_seed1", "grpo-s2"}
    one, two, base = paired["grpo_seed1"], paired["grpo-s2"], paired["base"]
    assert (one["only_policy_correct"], one["only_baseline_correct"], one["n_paired"]) == ("12", "2", "30")
    assert float(one["diff"]) == pytest.approx(10 / 30)
    assert float(one["mcnemar_p"]) == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)   # 0.01294
    assert float(one["diff_ci_low"]) > 0 and one["significant"] == "True"
    assert float(two["mcnemar_p"]) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)   # 0.109: b=8, c=2
    assert two["significant"] == "False"
    assert (base["only_policy_correct"], base["only_baseline_correct"]) == ("0", "8")
    assert float(base["diff"]) < 0 and base["baseline"] == "sft"
    assert {row["paired_on"] for row in paired.values()} == {"greedy"}   # no sampled columns: greedy
    assert one["exec_acc"] == one["greedy_exec_acc"] and one["baseline_exec_acc"] == one["baseline_greedy_exec_acc"]


def test_report_and_plots(compared):
    report = (compared / "report.md").read_text()
    for word in ("base", "sft", "grpo", "run_cmp", "Underpowered", "not significant", "McNemar"):
        assert word in report, word
    for name in PLOTS:
        png = compared / "plots" / f"{name}.png"
        assert f"](plots/{name}.png)" in report
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name   # a real figure, not an empty canvas
    manifest = json.loads((compared / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["module"] == "11_comparison"
    assert len(manifest["inputs"]) == len(POLICIES)
    assert all(len(entry["sha256"]) == 64 and entry["sha256"] in report for entry in manifest["inputs"].values())


# 10_evaluate.py --num_samples K: per policy (K, each item's sampled_exec_acc for items 0-29)
SAMPLED_MEANS = {
    "sft": (4, [0.75] * 10 + [0.25] * 20),                 # mean (7.5 + 5) / 30 = 12.5 / 30
    "grpo_seed1": (4, [0.0] * 2 + [0.5] * 20 + [0.25] * 8),  # mean 12 / 30: vs sft -0.5 / 30 (greedy +10 / 30)
    "grpo-s2": (8, [1.0] * 30),                            # every item above sft's: +17.5 / 30, each diff > 0
    "base": (0, None),                                     # greedy only: the new columns empty
}


def add_samples(folder: Path, k: int, means) -> dict:
    """Rewrite a fixture policy's metrics.json and breakdown.csv as 10_evaluate.py --num_samples k writes them."""
    with open(folder / "breakdown.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row, mean in zip(rows, means or [None] * len(rows)):
        row.update({"sampled_exec_acc": "" if mean is None else str(mean),
                    "sampled_format_rate": "" if mean is None else "1.0",
                    "sampled_reward_mean": "" if mean is None else str(mean - 0.25)})
    with open(folder / "breakdown.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(num_samples=k, sample_temperature=0.7, sample_top_p=0.95)
    if k:
        acc = sum(means) / len(means)
        metrics.update(sampled_exec_acc=acc, sampled_exec_acc_ci95=[acc - 0.1, acc + 0.1], sampled_format_rate=1.0,
                       sampled_reward_mean=acc - 0.25, sampled_exec_pass_at_k=sum(m > 0 for m in means) / len(means))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """(output folder, the script's stderr, metrics by policy) of the fixtures rewritten with SAMPLED_MEANS."""
    root = tmp_path_factory.mktemp("sampled")
    shutil.copytree(FIXTURE / "10_evaluation", root / "10_evaluation")
    metrics = {name: add_samples(root / "10_evaluation" / name, k, means) for name, (k, means) in SAMPLED_MEANS.items()}
    done = run(root / "10_evaluation", "--output_dir", root / "out", "--bootstrap", 1000)
    assert done.returncode == 0, done.stderr
    return root / "out", done.stderr, metrics


def test_paired_on_sampled_means(sampled_run):
    out, stderr, _ = sampled_run
    paired = read_csv(out / "paired.csv")
    one, two = paired["grpo_seed1"], paired["grpo-s2"]
    assert one["paired_on"] == "sampled mean of K=4"
    assert float(one["exec_acc"]) == pytest.approx(12 / 30)
    assert float(one["baseline_exec_acc"]) == pytest.approx(12.5 / 30)
    # per item: 0-1 0 - 0.75, 2-9 0.5 - 0.75, 10-21 0.5 - 0.25, 22-29 0.25 - 0.25: (-1.5 - 2 + 3 + 0) / 30
    assert float(one["diff"]) == pytest.approx(-0.5 / 30)
    assert float(one["diff_ci_low"]) < 0 < float(one["diff_ci_high"]) and one["significant"] == "False"
    # McNemar stays on greedy exec_correct: 12 vs 2, p = 0.0129 (significant under the greedy rule)
    assert (float(one["greedy_exec_acc"]), float(one["baseline_greedy_exec_acc"])) == (20 / 30, 10 / 30)
    assert (one["only_policy_correct"], one["only_baseline_correct"]) == ("12", "2")
    assert float(one["mcnemar_p"]) == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)
    # K=8 vs K=4: still paired on the sampled means, with a warning; every item's diff is 0.25 or 0.75
    assert two["paired_on"] == "sampled mean of K=8 (baseline K=4)" and "num_samples 8 vs 4" in stderr
    assert float(two["diff"]) == pytest.approx(17.5 / 30) and float(two["diff_ci_low"]) >= 0.25
    assert float(two["mcnemar_p"]) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)   # 0.109 on greedy
    assert two["significant"] == "True"   # the sampled CI excludes 0; McNemar is not required


def test_paired_falls_back_to_greedy_when_one_side_is_greedy_only(sampled_run):
    out, stderr, _ = sampled_run
    base = read_csv(out / "paired.csv")["base"]   # base: num_samples 0, empty sampled columns; sft sampled
    assert base["paired_on"] == "greedy"
    assert (float(base["exec_acc"]), float(base["baseline_exec_acc"])) == (2 / 30, 10 / 30)
    assert float(base["diff"]) == pytest.approx(-8 / 30) and base["exec_acc"] == base["greedy_exec_acc"]
    assert float(base["mcnemar_p"]) == pytest.approx(2 / 2 ** 8) and base["significant"] == "True"  # 0 vs 8
    assert "base vs sft: not both have sampled_exec_acc on every shared item: paired on greedy" in stderr


def test_sampled_summary_and_report(sampled_run):
    out, _, metrics = sampled_run
    summary = read_csv(out / "summary.csv")
    for policy in ("sft", "grpo_seed1", "grpo-s2"):
        row, numbers = summary[policy], metrics[policy]
        assert int(row["num_samples"]) == numbers["num_samples"] and float(row["sample_temperature"]) == 0.7
        for name in ("sampled_exec_acc", "sampled_format_rate", "sampled_reward_mean", "sampled_exec_pass_at_k"):
            assert float(row[name]) == numbers[name], (policy, name)   # exact: no rounding
        assert [float(row["sampled_exec_acc_ci_low"]), float(row["sampled_exec_acc_ci_high"])] == \
            numbers["sampled_exec_acc_ci95"]
    assert float(summary["grpo_seed1"]["sampled_exec_pass_at_k"]) == 28 / 30   # all but items 0-1
    assert summary["base"]["num_samples"] == "0"
    assert summary["base"]["sampled_exec_acc"] == summary["base"]["sample_temperature"] == ""   # greedy only
    report = (out / "report.md").read_text()
    assert "(exec_acc paired on greedy / sampled mean of K=4 / sampled mean of K=8 (baseline K=4), same test" in report
    assert "| grpo_seed1 | 30 | sampled mean of K=4 | 0.400 | 0.417 | -0.017 |" in report
    assert "paired on sampled means: the 95% paired bootstrap CI of the difference excludes 0" in report
    assert "grpo_seed1 vs sft (sampled mean of K=4): exec_acc difference -0.017" in report   # conclusions
    assert "Sampled evaluation (exec_acc averaged over each item's K sampled completions): sft 0.417 (K=4)" in report
    assert "greedy only: base." in report
    assert "| num_samples | sampled_exec_acc |" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["paired_on"]["base"] == "greedy"


def test_default_output_and_tolerance(tmp_path):
    """Copied run without checkpoints: training info from <run>/03_sft (its log corrupt), a missing breakdown."""
    run_dir = tmp_path / "outputs" / "run_t"
    shutil.copytree(FIXTURE / "10_evaluation", run_dir / "10_evaluation")
    for metrics_file in (run_dir / "10_evaluation").glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        metrics_file.write_text(json.dumps({**metrics, "checkpoint": None}))
    (run_dir / "10_evaluation" / "grpo-s2" / "breakdown.csv").unlink()
    (run_dir / "03_sft" / "logs").mkdir(parents=True)
    (run_dir / "03_sft" / "manifest.json").write_text(json.dumps({"duration_s": 360.0, "device": "cpu", "seed": 7}))
    (run_dir / "03_sft" / "logs" / "training_log.json").write_text('{"log_history": [{"step": 1,')
    done = run(run_dir / "10_evaluation", "--bootstrap", 200, "--baseline", "sft")
    assert done.returncode == 0, done.stderr
    assert "training_log.json" in done.stderr and "breakdown.csv" in done.stderr   # both warned about
    out = run_dir / "11_comparison"
    summary = read_csv(out / "summary.csv")
    assert (summary["sft"]["seed"], float(summary["sft"]["compute_hours"])) == ("7", 0.1)  # 360 s
    assert summary["grpo_seed1"]["compute_hours"] == ""   # no checkpoint, not named like its method
    assert set(read_csv(out / "paired.csv")) == {"base", "grpo_seed1"}
    assert all((out / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC for name in PLOTS)


def test_real_evaluation_outputs(tmp_path):
    """Two policies scored by 10_evaluate.py itself (predictions mode, no model) compare cleanly."""
    evaluations = tmp_path / "outputs" / "run_e" / "10_evaluation"
    for name, predictions in (("sft", "eval_predictions.jsonl"), ("grpo", "eval_predictions_official.json")):
        done = subprocess.run([sys.executable, "10_evaluate.py", "--test_jsonl", "tests/fixtures/eval_data.jsonl",
                               "--predictions", f"tests/fixtures/{predictions}", "--policy_name", name,
                               "--output_dir", evaluations / name, "--bootstrap", "50"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    done = run(evaluations, "--bootstrap", 100)
    assert done.returncode == 0, done.stderr
    summary = read_csv(evaluations.parent / "11_comparison" / "summary.csv")
    metrics = json.loads((evaluations / "grpo" / "metrics.json").read_text())
    assert float(summary["grpo"]["exec_acc"]) == metrics["exec_acc"]
    assert summary["grpo"]["dataset_source"] == "synthetic"
    assert "Underpowered" in (evaluations.parent / "11_comparison" / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["tests/fixtures/compare/nope/metrics.json"], "no such metrics file"),   # a missing input
    (["tests/fixtures/eval_data.jsonl"], "invalid JSON"),                   # not a metrics.json at all
    ([METRICS_GLOB, "--bootstrap", "0"], "--bootstrap must be at least 1"),
])
def test_errors(args, message, tmp_path):
    done = run(*args, "--output_dir", tmp_path / "out")
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_error_bars_never_negative_when_mean_equals_a_degenerate_ci(tmp_path):
    """Every policy at the floor: mean -0.2 up to rounding and CI [-0.2, -0.2] (the quick test's case)."""
    from utils.plots import _errors, bars_by_policy

    mean = sum([-0.2] * 16) / 16  # -0.20000000000000004
    assert mean - -0.2 < 0
    below, above = _errors([mean, 0.5], [-0.2, 0.25], [-0.2, 0.75])
    assert below == [0.0, 0.25] and above == pytest.approx([0.0, 0.25]) and min(above) >= 0
    policy = {"method": "sft", "seed": 42, "label": "sft", "exec_acc": 0.0, "exec_acc_ci_low": 0.0, "exec_acc_ci_high": 0.0,
              "reward_mean": mean, "reward_mean_ci_low": -0.2, "reward_mean_ci_high": -0.2}
    path = bars_by_policy([policy, {**policy, "method": "ppo", "label": "ppo"}], tmp_path / "bars.png")
    assert Path(path).read_bytes()[:8] == PNG_MAGIC


def _policy_row(method, exec_acc, hours):
    return {"label": method, "method": method, "n": 16, "exec_acc": exec_acc, "compute_hours": hours,
            "compute_device": "cpu", "data_sha256": "same", "context_mode": "retrieved"}


def test_conclusions_name_no_best_method_when_all_tie_at_zero():
    from utils.comparison import conclusions

    summary = [_policy_row("base", 0.0, None), _policy_row("sft", 0.0, 0.03), _policy_row("grpo", 0.0, 0.02)]
    seeds = [{"method": r["method"], "exec_acc_mean": 0.0, "n_policies": 1} for r in summary]
    text = "\n".join(conclusions(summary, seeds, [], "sft"))
    assert "Best method" not in text and "every method has exec_acc 0.000 (no test item solved" in text
    assert "exec_acc per compute hour is 0 for all" in text
    # a newcomer whose methods all tie learns where to look next, and what it costs
    assert "python tests/benchmarks/bench_learnability.py" in text and "min on 2 CPU cores" in text


def test_conclusions_rank_and_efficiency():
    from utils.comparison import conclusions

    summary = [_policy_row("sft", 0.25, 0.5), _policy_row("grpo", 0.5, 2.0)]
    seeds = [{"method": r["method"], "exec_acc_mean": r["exec_acc"], "n_policies": 1} for r in summary]
    text = "\n".join(conclusions(summary, seeds, [], "sft"))
    assert "Best method by exec_acc: **grpo** (0.500)." in text
    assert "bench_learnability" not in text
    # exec_acc per hour: sft 0.25 / 0.5 = 0.5, grpo 0.5 / 2 = 0.25
    assert "Efficiency: sft gives the most exec_acc per training compute hour (0.5 per hour on cpu)" in text
