"""00_check_data.py and 01_prepare_dataset.py run as subprocesses on the FinQA sample."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.data import PROCESSED_FIELDS
from utils.runs import sha256_file

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "finqa-sample"
SAMPLE_ARG = "../shared/data/finqa-sample"  # as a researcher types it from the repo root
needs_sample = pytest.mark.skipif(not (SAMPLE / "train.json").is_file(),
                                  reason=f"FinQA sample not found at {SAMPLE}")


def run(script, *args, tmp_path):
    """Run a numbered script from the repo root; run folders go under tmp_path/outputs."""
    command = [sys.executable, script, *map(str, args), "--paths.output_root", str(tmp_path / "outputs")]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.fixtures.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


# --- 00_check_data.py ---

@needs_sample
def test_check_data_on_sample(tmp_path):
    out = tmp_path / "check"
    done = run("00_check_data.py", "--data_root", SAMPLE_ARG, "--output_dir", out, "--no_tokenizer",
               "--strict", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {split: r["n_examples"] for split, r in summary["splits"].items()} == \
        {"train": 100, "dev": 100, "test": 100}
    assert summary["totals"]["n_exec_correct"] == 300  # every sample gold program executes
    assert summary["splits"]["train"]["program_steps"] == {"1": 53, "2": 41, "3": 6}
    # e.g. dev CMCSA/2015/page_64.pdf-3 says "317.7" where its program gives 478.0
    assert summary["totals"]["n_answer_text_disagreements"] == 15
    samples = json.loads((out / "samples.json").read_text())
    assert [len(samples[split]) for split in ("train", "dev", "test")] == [3, 3, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["inputs"]["dev"]["sha256"] == sha256_file(SAMPLE / "dev.json")
    assert "300 gold programs execute" in done.stdout


@needs_sample
def test_check_data_counts_tokens(tmp_path, tiny_model):
    out = tmp_path / "check"
    done = run("00_check_data.py", "--data_root", SAMPLE_ARG, "--output_dir", out, "--splits", "dev",
               "--model.name_or_path", tiny_model, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    lengths = json.loads((out / "summary.json").read_text())["splits"]["dev"]["lengths"]
    assert lengths["question"]["tokens"]["max"] > lengths["question"]["words"]["max"] > 0
    assert lengths["prompt_full_over_budget"] >= 0


@needs_sample
@pytest.mark.parametrize("damage, message", [
    ("corrupt", r"dev\.json is not valid JSON \(line \d+, column \d+"),  # half a file
    ("missing", r"dev\.json.*bash download\.sh"),            # never downloaded
])
def test_check_data_bad_file_fails_clearly(tmp_path, damage, message):
    data = tmp_path / "finqa"
    shutil.copytree(SAMPLE, data)
    if damage == "corrupt":
        (data / "dev.json").write_text((SAMPLE / "dev.json").read_text()[:5000])
    else:
        (data / "dev.json").unlink()
    out = tmp_path / "check"
    done = run("00_check_data.py", "--data_root", data, "--output_dir", out, "--no_tokenizer",
               tmp_path=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "dev.json" in manifest["error"]
    assert json.loads((out / "summary.json").read_text())["splits"]["train"]["n_examples"] == 100


@needs_sample
def test_check_data_strict_fails_on_a_wrong_exe_ans(tmp_path):
    data = tmp_path / "finqa"
    shutil.copytree(SAMPLE, data)
    examples = json.loads((data / "test.json").read_text())
    examples[0]["qa"]["exe_ans"] = 12345.0
    (data / "test.json").write_text(json.dumps(examples))
    args = ["--data_root", data, "--output_dir", tmp_path / "check", "--no_tokenizer", "--splits", "test"]
    assert run("00_check_data.py", *args, tmp_path=tmp_path).returncode == 0  # report only
    done = run("00_check_data.py", *args, "--strict", tmp_path=tmp_path)
    assert done.returncode == 1 and "--strict" in done.stderr
    mismatch = json.loads((tmp_path / "check" / "summary.json").read_text())["splits"]["test"]["exec_mismatches"]
    assert [(m["id"], m["reason"]) for m in mismatch] == [(examples[0]["id"], "wrong value")]


# --- 01_prepare_dataset.py ---

def check_processed(folder: Path, tmp_path: Path, run_id: str, counts: dict) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    copy = json.loads((tmp_path / "outputs" / run_id / "01_preprocessing" / "manifest.json").read_text())
    assert copy == manifest
    firsts = []
    for split, count in counts.items():
        path = folder / f"{split}.jsonl"
        lines = path.read_text().splitlines()
        assert len(lines) == count
        first = json.loads(lines[0])
        assert set(PROCESSED_FIELDS) <= set(first), set(PROCESSED_FIELDS) - set(first)
        assert first["split"] == split
        assert manifest["metrics"]["files"][split]["sha256"] == sha256_file(path)
        firsts.append(first)
    return firsts


@needs_sample
@pytest.mark.parametrize("mode", ["retrieved", "gold"])
def test_prepare_finqa(tmp_path, mode):
    out = tmp_path / "processed"
    done = run("01_prepare_dataset.py", "--data_root", SAMPLE_ARG, "--output_dir", out,
               "--context_mode", mode, "--run_id", "t", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    firsts = check_processed(out, tmp_path, "t", {"train": 100, "val": 100, "test": 100})
    assert {row["context_mode"] for row in firsts} == {mode}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["oracle_context"] == (mode == "gold")
    assert manifest["inputs"]["dev"]["sha256"] == sha256_file(SAMPLE / "dev.json")


@needs_sample
def test_prepare_finqa_full_context_truncates(tmp_path, tiny_model):
    out = tmp_path / "processed"
    done = run("01_prepare_dataset.py", "--data_root", SAMPLE_ARG, "--output_dir", out,
               "--context_mode", "full", "--max_prompt_tokens", 700, "--quick_test", "--run_id", "t",
               "--model.name_or_path", tiny_model, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    firsts = check_processed(out, tmp_path, "t", {"train": 20, "val": 20, "test": 20})
    assert all(row["prompt"][1]["content"].endswith("Question: " + row["question"]) for row in firsts)
    files = json.loads((out / "manifest.json").read_text())["metrics"]["files"]
    assert files["train"]["n_context_truncated"] > 0


@needs_sample
def test_prepare_full_context_without_tokenizer_fails_clearly(tmp_path):
    done = run("01_prepare_dataset.py", "--data_root", SAMPLE_ARG, "--output_dir", tmp_path / "p",
               "--context_mode", "full", "--model.name_or_path", tmp_path / "no_model",
               "--model.gguf_package", "no_such_package", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--max_prompt_tokens 0" in done.stderr


def test_prepare_synthetic_is_deterministic(tmp_path):
    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        done = run("01_prepare_dataset.py", "--dataset", "synthetic", "--num_examples", 50, "--seed", 7,
                   "--output_dir", out, "--run_id", attempt, tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
        firsts = check_processed(out, tmp_path, attempt, {"train": 40, "val": 5, "test": 5})
        assert {row["source"] for row in firsts} == {"synthetic"}
        digests.append([sha256_file(out / f"{split}.jsonl") for split in ("train", "val", "test")])
    assert digests[0] == digests[1]


def test_prepare_synthetic_levels_rows_and_manifest(tmp_path):
    out = tmp_path / "ladder"
    done = run("01_prepare_dataset.py", "--dataset", "synthetic", "--levels", 1, 3, "--num_examples", 60,
               "--output_dir", out, "--run_id", "ladder", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert {row["level"] for row in rows} == {1, 3}
    assert all(row["level"] == row["target_program"].count("(") for row in rows)
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    assert manifest["synthetic"]["levels"] == [1, 3]
    counts = manifest["files"]["train"]["levels"]
    assert set(counts) == {"1", "3"} and sum(counts.values()) == len(rows) == 48


def test_prepare_levels_need_the_synthetic_dataset(tmp_path):
    done = run("01_prepare_dataset.py", "--levels", 1, "--output_dir", tmp_path / "p", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--dataset synthetic" in done.stderr and not (tmp_path / "p" / "train.jsonl").exists()


def test_prepare_missing_finqa_says_how_to_get_it(tmp_path):
    done = run("01_prepare_dataset.py", "--data_root", tmp_path / "nowhere", "--output_dir",
               tmp_path / "p", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.json" in done.stderr and "bash download.sh" in done.stderr
