"""utils.runs: manifest lifecycle, hashing, atomic writes, seeding and run folders."""
import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import random
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import runs
from utils.runs import Manifest

MANIFEST_FIELDS = ["module", "status", "started_at", "finished_at", "duration_s", "command", "args",
                   "config", "seed", "git", "versions", "device", "inputs", "outputs", "metrics"]


def read_manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


# --- manifest ---
def test_manifest_lifecycle(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1}\n')
    config = {"training": {"seed": 42}}
    with Manifest(tmp_path, "03_sft", {"run_id": "run_001"}, config, seed=7) as manifest:
        during = read_manifest(tmp_path)
        manifest.add_input("train", data)
        manifest.add_output("final", tmp_path / "ckpt_sft" / "final")
        manifest.metrics["exec_acc"] = 0.5
    after = read_manifest(tmp_path)

    assert during["status"] == "running"
    assert during["finished_at"] is None and during["duration_s"] is None
    assert list(after) == MANIFEST_FIELDS  # exactly DESIGN.md's fields, in its order, no error
    assert after["status"] == "complete"
    assert after["module"] == "03_sft" and after["seed"] == 7 and after["config"] == config
    assert after["args"] == {"run_id": "run_001"}
    digest = hashlib.sha256(b'{"id": 1}\n').hexdigest()
    assert after["inputs"] == {"train": {"path": str(data), "sha256": digest}}
    assert after["outputs"] == {"final": str(tmp_path / "ckpt_sft" / "final")}
    assert after["metrics"] == {"exec_acc": 0.5}
    started = datetime.fromisoformat(after["started_at"])
    finished = datetime.fromisoformat(after["finished_at"])
    assert started.utcoffset() == timedelta(0) and finished >= started
    assert after["duration_s"] >= 0
    assert set(after["versions"]) == {"python", "torch", "transformers", "trl", "peft", "accelerate"}
    assert after["versions"]["python"] == platform.python_version()
    assert after["versions"]["torch"] == importlib.metadata.version("torch")  # read without importing torch
    assert set(after["git"]) == {"commit", "dirty"}
    assert after["device"] == "cpu" or after["device"].startswith(("cuda:", "mps"))
    assert isinstance(after["command"], str) and after["command"]


def test_manifest_failure_records_error_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="out of memory"):
        with Manifest(tmp_path, "05_ppo"):
            raise RuntimeError("out of memory")
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "failed"
    assert manifest["error"] == "RuntimeError: out of memory"
    assert manifest["finished_at"] is not None


def test_manifest_accepts_namespace_and_takes_seed_from_config(tmp_path):
    args = argparse.Namespace(run_id="run_002", output_dir=tmp_path)
    with Manifest(tmp_path, "04_candidates", args, {"training": {"seed": 13}}):
        pass
    manifest = read_manifest(tmp_path)
    assert manifest["args"] == {"run_id": "run_002", "output_dir": str(tmp_path)}  # Path written as text
    assert manifest["seed"] == 13


def test_manifest_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input 'policy'"):
        with Manifest(tmp_path, "10_evaluation") as manifest:
            manifest.add_input("policy", tmp_path / "missing")
    assert read_manifest(tmp_path)["status"] == "failed"


def test_manifest_write_mid_run_records_metrics(tmp_path):
    with Manifest(tmp_path, "06_grpo") as manifest:
        manifest.metrics["reward_mean"] = 0.25
        manifest.write()
        during = read_manifest(tmp_path)
    assert during["status"] == "running" and during["metrics"] == {"reward_mean": 0.25}


# --- hashing ---
def test_sha256_of_known_content(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    # the FIPS 180-2 example digest of "abc"
    assert runs.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_streams_in_chunks_like_hashlib(tmp_path):
    data = bytes(range(256)) * 4099  # not a multiple of the chunk size
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert runs.sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert runs.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_folder_depends_on_names_and_contents(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"1")
    (folder / "sub" / "b.bin").write_bytes(b"2")
    first = runs.sha256_path(folder)
    assert runs.sha256_path(folder) == first                     # stable
    (folder / "a.bin").write_bytes(b"3")
    changed = runs.sha256_path(folder)
    assert changed != first                                      # content matters
    (folder / "a.bin").rename(folder / "c.bin")
    assert runs.sha256_path(folder) != changed                   # names matter


# --- atomic writes ---
def test_atomic_writes_leave_no_temp_files(tmp_path):
    runs.atomic_write_json(tmp_path / "a.json", {"x": 1})
    runs.atomic_write_jsonl(tmp_path / "b.jsonl", [{"i": 0}, {"i": 1}])
    runs.atomic_write_text(tmp_path / "c.txt", "hello\n")
    runs.atomic_write_json(tmp_path / "a.json", {"x": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl", "c.txt"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert runs.read_jsonl(tmp_path / "b.jsonl") == [{"i": 0}, {"i": 1}]


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    runs.atomic_write_json(target, {"old": True})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_json(target, {"new": True})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert json.loads(target.read_text()) == {"old": True}


def test_atomic_write_creates_parent_folders(tmp_path):
    runs.atomic_write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x"


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3: invalid JSON"):
        runs.read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        runs.read_jsonl(tmp_path / "missing.jsonl")


def test_read_records_checks_the_fields_it_is_given(tmp_path):
    fields = {"id": (lambda v: isinstance(v, str), "a string"), "score": (lambda v: isinstance(v, float), "a float")}
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "score": 0.5, "extra": [1]}\n\n{"id": "b", "score": 1.5}\n')
    assert runs.read_records(path, fields, "w.py") == [(1, {"id": "a", "score": 0.5, "extra": [1]}),
                                                        (3, {"id": "b", "score": 1.5})]
    path.write_text('{"id": "a", "score": 0.5}\n{"id": "b"}\n')
    with pytest.raises(runs.UsageError, match=r"records.jsonl: line 2 lacks score; rerun python w.py"):
        runs.read_records(path, fields, "w.py")
    assert runs.read_records(path, fields, "w.py", required=("id",))[1] == (2, {"id": "b"})
    path.write_text('{"id": "a", "score": "high"}\n')
    with pytest.raises(runs.UsageError, match=r"line 1: score should be a float, got 'high'; rerun python w.py"):
        runs.read_records(path, fields, "w.py", required=("id",))


# --- seeding ---
def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_seed_everything_repeats_draws():
    runs.seed_everything(123)
    first = draws()
    runs.seed_everything(123)
    assert draws() == first
    runs.seed_everything(124)
    assert draws() != first


# --- folders ---
@pytest.mark.parametrize("bad", [
    "run 001",    # space
    "../escape",  # path traversal
    "a/b",        # nested folder
    "run.1",      # dot
    "",           # empty
])
def test_bad_run_id_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="letters, digits"):
        runs.module_dir(bad, "03_sft", tmp_path / "out")


def test_module_dir_default_and_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = runs.module_dir("ablation-3_b", "03_sft")
    assert folder == tmp_path.joinpath("outputs", "ablation-3_b", "03_sft").relative_to(tmp_path)
    assert folder.is_dir()
    custom = runs.module_dir("run_001", "03_sft", tmp_path / "elsewhere")
    assert custom == tmp_path / "elsewhere" and custom.is_dir()


def test_git_info_outside_a_checkout(tmp_path, repo_root):
    assert runs.git_info(tmp_path) == {"commit": None, "dirty": None}
    info = runs.git_info(repo_root)
    assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)


def test_timestamp_is_utc_iso():
    assert datetime.fromisoformat(runs.timestamp()).utcoffset() == timedelta(0)


# --- one writer per folder ---

def hold_lock(folder) -> "subprocess.Popen":
    """Another process that takes `folder`'s lock and keeps it until killed."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils import runs; "
                               "runs.lock_folder(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(folder)],
                              cwd=runs.REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    time.sleep(0.1)
    return holder


def test_a_live_writer_keeps_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_held_locks", set())
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(runs.UsageError, match=rf"run is being written by process {holder.pid} on "):
            Manifest(tmp_path / "run", "03_sft").__enter__()
        assert not (tmp_path / "run" / "manifest.json").exists()      # the second writer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    with Manifest(tmp_path / "run", "03_sft") as manifest:             # the killed writer's lock: taken over
        pass
    lock = json.loads((tmp_path / "run" / runs.LOCK_FILE).read_text())
    assert lock["pid"] == os.getpid() and manifest.status == "complete"
    runs.lock_folder(tmp_path / "run")                                # this process already holds it: a no-op
    runs._release(tmp_path / "run" / runs.LOCK_FILE)
    assert not (tmp_path / "run" / runs.LOCK_FILE).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["manifest.json"]   # no staging file left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="zombies are told apart through /proc")
def test_a_killed_writer_not_yet_reaped_is_dead(tmp_path, monkeypatch):
    """A SIGKILLed stage whose parent died too waits as a zombie until init reaps it; a rerun must not wait."""
    import subprocess
    import sys
    import time

    monkeypatch.setattr(runs, "_held_locks", set())
    holder = hold_lock(tmp_path / "run")
    holder.kill()
    try:
        for _ in range(100):  # not reaped (no wait yet): a zombie that signalling still finds
            if Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        os.kill(holder.pid, 0)
        runs.lock_folder(tmp_path / "run")                           # taken over, not "being written by"
        assert json.loads((tmp_path / "run" / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        holder.wait()
    runs._release(tmp_path / "run" / runs.LOCK_FILE)
    assert runs._alive({"pid": os.getpid(), "host": platform.node()})      # a running one is alive
    assert runs._alive({"pid": holder.pid, "host": "elsewhere"})                  # another host: cannot tell


def test_a_second_driver_on_a_live_run_stops_in_one_line(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "out" / "busy"
    holder = hold_lock(run)   # the first driver's lock on its run folder
    try:
        done = subprocess.run([sys.executable, "12_driver.py", "--method", "grpo", "--quick_test", "--run_id", "busy",
                               "--paths.output_root", str(tmp_path / "out")], cwd=runs.REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{run.resolve()} is being written by process {holder.pid}" in done.stderr
    assert not (run / "run_manifest.json").exists() and not (run / "logs").exists()
