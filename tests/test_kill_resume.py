"""Kill anywhere, rerun, same result; same seed, same files (the main job on a tiny model).

Every run is `12_driver.py --method all --quick_test` on a tiny model taught the answer format (so samples
differ in reward, 08 finds pairs and the metrics are not all at their floor) and synthetic FinQA-format raw
files. Every run writes into the same folder (work/: outputs and processed data), moved aside when the run
ends, so that paths inside the files match and the files can be compared byte for byte.

- Same seed: two uninterrupted runs give byte-identical pairs.jsonl and candidates.jsonl, and metrics.json
  and summary.csv identical apart from timing fields; another seed gives other candidates.
- Kill anywhere: a run SIGKILLed (driver and stage together, as pre-emption or the OOM killer would) at
  KILL_POINTS, the same command rerun after each kill, ends with the uninterrupted run's files; no
  half-written file is left; every stage's manifest says complete.

The driver reruns a stage that did not complete; a trainer cut short continues from its newest complete
checkpoint (--resume auto: optimizer, scheduler, RNG, training log, best so far), others start afresh.
"""
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Two steps with a checkpoint and a validation after each, so that a kill can land between checkpoints.
BUDGETS = ["--training.max_steps", "2", "--training.save_steps", "1", "--validation.eval_steps", "1",
           "--validation.num_samples", "2",
           "--validation.max_new_tokens", "48", "--generation.max_new_tokens", "48",
           "--training.per_device_train_batch_size", "2", "--training.gradient_accumulation_steps", "2"]
POLICIES = ("base", "sft", "ppo", "grpo", "rloo", "dpo")

# (stage, marker in its output, occurrence, seconds to wait after it): the kill lands there. A marker is
# counted only in the output of the stage's own run (after its "[ i/n] stage: ... [runs because" header).
# Trainers validate and checkpoint after each of their 2 steps, and log "{'loss'" at each step (PPO:
# "step N/2"): a kill at the second is between checkpoints, and the rerun continues from checkpoint 1.
KILL_POINTS = [
    ("02_rewards", b": done in", 1, 0.0),               # between stages: 02 recorded, 03 not started
    ("03_sft", b"{'loss'", 1, 0.0),                     # SFT's first step, before any checkpoint: starts afresh
    ("03_sft", b"{'loss'", 2, 0.0),                     # SFT between checkpoints: continues from checkpoint 1
    ("04_candidates", b"candidates:", 1, 0.5),          # during candidate generation
    ("05_ppo", b"step 2/", 1, 0.0),                     # PPO after its second rollout: continues from step 1
    ("06_grpo", b"{'loss'", 2, 0.0),                    # GRPO between checkpoints
    ("07_rloo", b"validation step", 1, 0.0),            # RLOO validating step 1, its checkpoint not written
    ("09_dpo", b"{'loss'", 2, 0.0),                     # DPO between checkpoints
    ("10_eval_grpo", b"evaluating:", 1, 0.0),           # during an evaluation
    ("11_comparison", b"$ python 11_compare_runs.py", 1, 1.5),  # while 11 computes and writes its report
]
RESUMED_FROM_A_CHECKPOINT = {"03_sft", "05_ppo", "06_grpo", "09_dpo"}
NEXT_STAGE = b"\n" + b"=" * 100 + b"\n["   # the driver's banner before a stage runs
# Fields that measure time or the machine, not the result.
TIMING = re.compile(r"(wall_time|runtime|_s$|_s_mean$|per_s|tokens_per|hours|peak_|_at$|duration|eval_s)")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The raw files, the tiny model and the driver command (writing into work/)."""
    from tests.fixtures.tiny_model import build_tiny_model, teach_answer_format
    from utils.runs import atomic_write_json
    from utils.synthetic import generate

    tmp = tmp_path_factory.mktemp("kill")
    splits = generate(60, seed=0)
    for split, examples in splits.items():
        atomic_write_json(tmp / "raw" / f"{split}.json", examples)
    tiny = teach_answer_format(build_tiny_model(tmp / "tiny"), splits["train"])
    command = [sys.executable, "12_driver.py", "--method", "all", "--quick_test", "--run_id", "rep",
               "--data_root", tmp / "raw", "--paths.output_root", tmp / "work" / "outputs",
               "--paths.data_dir", tmp / "work" / "data", "--model.name_or_path", tiny, "--model.dtype", "float32",
               *BUDGETS]
    return tmp, [str(part) for part in command]


def finish(command, *extra) -> bytes:
    done = subprocess.run([*command, *extra], cwd=REPO, capture_output=True, timeout=1200)
    assert done.returncode == 0, (done.stdout[-4000:] + done.stderr[-4000:]).decode(errors="replace")
    return done.stdout


def resumed_stages(output: bytes) -> set[str]:
    """Stages whose run in this output continued from a checkpoint ("resuming from" in their section)."""
    sections = output.split(NEXT_STAGE)[1:]
    return {re.match(rb"\s*\d+/\d+\] (\S+):", section).group(1).decode() for section in sections
            if b"resuming from " in section}


def wait_until_group_ended(group: int, timeout: float = 60.0) -> None:
    """Until every process of the group has exited (gone, or a zombie that init has yet to reap), as after a
    pre-emption: SIGKILL is delivered at once, but a process caught in a system call ends a little later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()   # state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                running.append(stat.parent.name)
        if not running:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {running} of the killed group {group} still run after {timeout} s")


def kill_at(command, stage: str, marker: bytes, occurrence: int, delay: float) -> bytes:
    """Run the command until `marker` has appeared `occurrence` times in `stage`'s output, wait `delay` s,
    SIGKILL the driver and the stage (one process group). Returns the output; fails if the marker never came."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    header = re.compile(rb"\] " + re.escape(stage.encode()) + rb": .*\[runs because")
    output = b""
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            output += chunk
            found = header.search(output)
            if found:
                own = output[found.end():].split(NEXT_STAGE)[0]

                if own.count(marker) >= occurrence:
                    time.sleep(delay)
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
        assert proc.wait(timeout=60) == -signal.SIGKILL, (
            f"the run ended before {stage} printed {marker!r}:\n" + output[-3000:].decode(errors="replace"))
        wait_until_group_ended(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    return output


def move_run(tmp: Path, name: str) -> Path:
    """The finished run's folder (outputs and processed data), moved aside so the next run starts afresh."""
    dest = tmp / name
    shutil.move(tmp / "work", dest)
    return dest / "outputs" / "rep"


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def summary_rows(run: Path) -> list[dict]:
    rows = csv.DictReader(io.StringIO((run / "11_comparison" / "summary.csv").read_text()))
    return [without_timing(row) for row in rows]


def assert_same_result(run: Path, reference: Path) -> None:
    """What the issue calls the same result: every metrics.json and summary.csv apart from timing fields,
    pairs.jsonl and candidates.jsonl byte for byte, and the trained adapters' weights byte for byte."""
    for policy in POLICIES:
        got, want = (json.loads((r / "10_evaluation" / policy / "metrics.json").read_text()) for r in (run, reference))
        assert without_timing(got) == without_timing(want), policy
    assert summary_rows(run) == summary_rows(reference)
    for name in ("08_preferences/pairs.jsonl", "04_candidates/candidates.jsonl",
                 *(f"{folder}/ckpt_{method}/final/adapter_model.safetensors"
                   for folder, method in (("03_sft", "sft"), ("05_ppo", "ppo"), ("06_grpo", "grpo"),
                                          ("07_rloo", "rloo"), ("09_dpo", "dpo")))):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference_run(job) -> Path:
    """The uninterrupted run; rerun once (every stage skipped) and planned with --force before it moves."""
    tmp, command = job
    finish(command)
    state = json.loads((tmp / "work" / "outputs" / "rep" / "run_manifest.json").read_text())
    assert state["status"] == "complete" and state["methods"] == ["ppo", "grpo", "rloo", "dpo"]
    assert len(state["stages"]) == 17 and all(r["status"] == "complete" for r in state["stages"].values())
    assert all(Path(r["manifest"]).is_file() and Path(r["log"]).is_file() for r in state["stages"].values())
    t0 = time.monotonic()
    again = finish(command)
    assert again.count(b": skipped (") == 17, again.decode(errors="replace")
    assert time.monotonic() - t0 < 30
    forced = finish(command, "--force", "11_comparison", "--dry_run")   # the plan names what would rerun
    assert b"11_comparison: run (forced" in forced and forced.count(b": skip (") == 16
    return move_run(tmp, "uninterrupted")


@pytest.mark.slow
def test_main_job_writes_every_stage(reference_run):
    for path in ("03_sft/ckpt_sft/final", "05_ppo/ckpt_ppo/final", "06_grpo/ckpt_grpo/final",
                 "07_rloo/ckpt_rloo/final", "09_dpo/ckpt_dpo/final", "11_comparison/report.md", "run_manifest.json",
                 "README.md", *(f"10_evaluation/{p}/metrics.json" for p in POLICIES)):
        assert (reference_run / path).exists(), path
    report = (reference_run / "11_comparison" / "report.md").read_text()
    assert all(policy in report for policy in POLICIES)
    assert "| ppo |" in (reference_run / "README.md").read_text()
    assert not (REPO / "outputs" / "rep").exists()           # everything went to tmp_path


@pytest.mark.slow
def test_same_seed_same_files_other_seed_other_candidates(job, reference_run):
    tmp, command = job
    pairs = (reference_run / "08_preferences" / "pairs.jsonl").read_text().splitlines()
    sft = json.loads((reference_run / "10_evaluation" / "sft" / "metrics.json").read_text())
    assert pairs and 0 < sft["format_rate"], "the taught tiny model must give pairs and some valid answers"

    finish(command)
    assert_same_result(move_run(tmp, "again"), reference_run)

    finish(command, "--seeds", "7", "--method", "dpo")      # another seed: another SFT, other samples
    other = move_run(tmp, "seed7") / "04_candidates" / "candidates.jsonl"
    reference = reference_run / "04_candidates" / "candidates.jsonl"
    assert other.read_text() != reference.read_text()
    assert [json.loads(line)["id"] for line in other.read_text().splitlines()] == \
           [json.loads(line)["id"] for line in reference.read_text().splitlines()]   # same prompts


@pytest.mark.slow
def test_killed_anywhere_and_rerun_ends_with_the_uninterrupted_result(job, reference_run):
    tmp, command = job
    outputs = [kill_at(command, *point) for point in KILL_POINTS]
    outputs.append(finish(command))
    run = move_run(tmp, "killed")
    assert set().union(*map(resumed_stages, outputs)) == RESUMED_FROM_A_CHECKPOINT

    assert_same_result(run, reference_run)
    state = json.loads((run / "run_manifest.json").read_text())
    assert state["status"] == "complete" and len(state["invocations"]) == len(KILL_POINTS) + 1
    for name, record in state["stages"].items():   # the manifest chain: every stage complete, its inputs recorded
        assert record["status"] == "complete", name
        manifest = run.parent.parent / Path(record["manifest"]).relative_to(tmp / "work")   # where it moved
        assert json.loads(manifest.read_text())["status"] == "complete", name
    leftovers = [p for p in run.parent.parent.rglob("*") if p.name.startswith(".") or ".partial-" in p.name
                 or p.name.endswith(".tmp")]
    assert leftovers == []                           # no half-written file or checkpoint
