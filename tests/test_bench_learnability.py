"""tests/benchmarks/bench_learnability.py's arithmetic on hand-made breakdowns: paired changes, pooling over
seeds by prompt, the per-method criterion, and the DPO held-out CI over prompts."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_learnability", REPO / "tests" / "benchmarks" / "bench_learnability.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

COLUMNS = ("id", "exec_correct", "format_valid", "sampled_exec_acc", "sampled_reward_mean", "sampled_exec_pass")


def breakdown(run_dir: Path, name: str, sampled: list[float], greedy: list[bool]) -> None:
    folder = run_dir / "10_evaluation" / name
    folder.mkdir(parents=True)
    with open(folder / "breakdown.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for i, (s, g) in enumerate(zip(sampled, greedy)):
            writer.writerow({"id": f"p{i}", "exec_correct": g, "format_valid": True, "sampled_exec_acc": s,
                             "sampled_reward_mean": s - 0.5, "sampled_exec_pass": s > 0})


@pytest.fixture
def run_dir(tmp_path):
    breakdown(tmp_path, "start", [0.0, 0.25, 0.5, 0.0], [False, False, True, False])
    breakdown(tmp_path, "grpo_seed1", [0.25, 0.5, 0.5, 0.0], [True, False, True, False])
    breakdown(tmp_path, "grpo_seed2", [0.0, 0.75, 0.5, 0.25], [False, True, True, False])
    breakdown(tmp_path, "rloo_seed1", [0.0, 0.25, 0.25, 0.0], [False, False, False, False])
    return tmp_path


def test_paired_change(run_dir):
    change = bench.paired_change(run_dir, "start", "grpo_seed1", seed=0)
    assert change["n_paired"] == 4
    assert change["sampled_exec_acc_diff"] == pytest.approx(0.5 / 4)        # +0.25 +0.25 on two prompts
    assert change["sampled_reward_mean_diff"] == pytest.approx(0.5 / 4)
    assert change["sampled_exec_pass_diff"] == pytest.approx(1 / 4)         # p0 now passes
    assert change["greedy_exec_correct_mcnemar"][:2] == [1, 0]              # only the end gets p0
    low, high = change["sampled_exec_acc_diff_ci95"]
    assert 0 <= low <= change["sampled_exec_acc_diff"] <= high <= 0.25


def test_pooled_is_paired_by_prompt_over_seeds(run_dir):
    pooled = bench.pooled(run_dir, ["grpo_seed1", "grpo_seed2"], ["start"], seed=0)
    # per prompt, mean over seeds minus start: +0.125, +0.375, 0, +0.125 -> mean 0.15625
    assert pooled["n_prompts"] == 4 and pooled["diff"] == pytest.approx(0.15625)
    low, high = pooled["ci95"]
    assert 0 < low <= 0.15625 <= high <= 0.375   # every prompt's difference is >= 0, some > 0
    against = bench.pooled(run_dir, ["grpo_seed1", "grpo_seed2"], ["rloo_seed1"], seed=0)
    assert against["diff"] == pytest.approx((0.125 + 0.375 + 0.25 + 0.125) / 4)


def test_method_summary_criterion(run_dir, monkeypatch):
    def row(method, seed, gain, kl):
        return {"method": method, "seed": seed, "policy": f"{method}_seed{seed}", "kl": kl,
                "change": {"sampled_exec_acc_diff": gain}}
    summary = {"setup": {"seed": 0}, "cells": {"grpo_seed1": row("grpo", 1, 0.125, 1.0),
                                              "grpo_seed2": row("grpo", 2, 0.1875, 2.0),
                                              "rloo_seed1": row("rloo", 1, -0.0625, 0.5)}}
    grpo = bench.method_summary(summary, "grpo", run_dir, target=6.0)
    assert grpo["seeds"] == [1, 2] and grpo["gain_mean"] == pytest.approx(0.15625) and grpo["passed"]
    assert grpo["gain_std"] == pytest.approx(0.0441941738, abs=1e-9) and grpo["kl_max"] == 2.0
    assert not bench.method_summary(summary, "grpo", run_dir, target=1.5)["passed"]   # KL over the target
    assert not bench.method_summary(summary, "rloo", run_dir, target=6.0)["passed"]   # a loss
    assert bench.method_summary(summary, "ppo", run_dir, target=6.0) is None


def test_holdout_pref_ci_resamples_prompts(tmp_path):
    folder = tmp_path / "09_dpo"
    folder.mkdir()
    metrics = {"holdout_n_pairs": 4, "holdout_n_prompts": 2, "holdout_pref_acc_before": 0.25,
               "holdout_logp_acc_after": 0.75, "holdout_pref_acc_after": 1.0,
               "holdout_pair_prompt_ids": ["a", "a", "a", "b"],
               "holdout_logp_correct_before": [True, False, False, False],
               "holdout_logp_correct_after": [True, True, False, True]}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    out = bench.holdout_pref_ci(tmp_path, seed=0)
    # prompt a: 1/3 -> 2/3, prompt b: 0 -> 1; the CI is over the two prompts' differences (1/3 and 1)
    low, high = out["diff_ci95"]
    assert low == pytest.approx(1 / 3) and high == pytest.approx(1.0)
    assert out["holdout_logp_acc_after"] == 0.75


def test_task_defaults_and_overrides():
    ladder = bench.parse_args(["--task", "ladder"])
    assert (ladder.seed, ladder.rl_seeds, ladder.sft_steps, ladder.completions, ladder.eval_examples) == \
        (0, [1, 2, 3], 100, 768, 200)
    assert ladder.run_id == "ladder_l1" and ladder.levels == [1]
    legacy = bench.parse_args([])
    assert (legacy.task, legacy.seed, legacy.rl_seeds, legacy.run_id, legacy.sft_steps) == ("format", 1, [1], "learn_s1", 12)
    mine = bench.parse_args(["--task", "ladder", "--levels", "2", "1", "--rl_seeds", "4", "--completions", "64"])
    assert (mine.levels, mine.rl_seeds, mine.completions, mine.run_id) == ([1, 2], [4], 64, "ladder_l12")


def test_zero_std_share_averages_the_logged_steps(tmp_path):
    logs = tmp_path / "06_grpo" / "logs"
    logs.mkdir(parents=True)
    history = [{"loss": 0.1, "frac_reward_zero_std": 0.5}, {"loss": 0.2, "frac_reward_zero_std": 1.0},
               {"val/reward": 0.3}]  # validation entries carry no group statistics
    (logs / "training_log.json").write_text(json.dumps({"log_history": history}))
    assert bench.zero_std_share(tmp_path, "grpo") == pytest.approx(0.75)
    (tmp_path / "09_dpo" / "logs").mkdir(parents=True)
    (tmp_path / "09_dpo" / "logs" / "training_log.json").write_text(json.dumps({"log_history": [{"loss": 0.6}]}))
    assert bench.zero_std_share(tmp_path, "dpo") is None


def test_ladder_groups_of_eight_keep_sixteen_completions_per_step():
    args = bench.parse_args(["--task", "ladder"])
    for method in ("grpo", "rloo"):
        flags = bench.method_flags(args, method)
        group = flags[flags.index("--algorithm.num_generations") + 1]
        assert bench.COMPLETIONS_PER_STEP[method] % group == 0 and group == 8
    assert "constant" in bench.TASKS["ladder"]["rl_flags"]
