"""tests/benchmarks/bench_gpu.py: its --dry_run (the whole pipeline on a tiny model, CPU) and its GPU check."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "tests/benchmarks/bench_gpu.py"]
METHODS = ("ppo", "grpo", "rloo", "dpo")


def run(*flags, timeout=600):
    return subprocess.run([*BENCH, *map(str, flags)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_table_and_summary(tmp_path):
    done = run("--dry_run", "--run_id", "dry", "--output_root", tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = tmp_path / "dry"
    # a row per method: start -> end of greedy and sampled exec_acc, each with the end's CI
    number, ci = r"\d\.\d{3}", r"\[\d\.\d\d, \d\.\d\d\]"
    for method in METHODS:
        row = re.search(rf"^{method} +{number} -> {number} {ci} +{number} -> {number} {ci} .*\d$",
                        done.stdout, re.MULTILINE)
        assert row, (method, done.stdout[-3000:])
    assert re.search(rf"^sft +{number} {ci} +{number} {ci}", done.stdout, re.MULTILINE), done.stdout[-3000:]

    # summary.json holds exactly what 10_evaluate wrote, for the start and each method's end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["methods"]) == list(METHODS)
    read = lambda name: json.loads((run_dir / "10_evaluation" / name / "metrics.json").read_text())  # noqa: E731
    start = read("sft_start")
    for key in ("exec_acc", "exec_acc_ci95", "sampled_exec_acc", "sampled_exec_acc_ci95", "sampled_exec_pass_at_k"):
        assert summary["start"][key] == start[key], key
    assert start["num_samples"] == 2
    completions = set()
    for method in METHODS:
        row, end = summary["methods"][method], read(method)
        for key in ("exec_acc", "exec_acc_ci95", "sampled_exec_acc", "sampled_exec_acc_ci95"):
            assert row["end"][key] == end[key], (method, key)
        assert row["train_s"] > 0 and row["steps"] >= 1 and row["s_per_step"] > 0
        completions.add(row["completions"])
    assert completions == {4}          # compute-matched: 1 step x 2 prompts x 2 generations each
    assert not list((REPO / "outputs").glob("dry*")) and (run_dir / "data" / "val.jsonl").is_file()


def test_without_gpu_exits_2_with_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    done = run("--run_id", "nogpu", "--output_root", tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "--dry_run" in done.stderr
    assert not (tmp_path / "nogpu").exists()
