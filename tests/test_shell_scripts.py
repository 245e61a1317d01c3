"""download.sh, activate.sh and setup.sh, run as a user would (no network needed)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "finqa-sample"
SPLITS = ("train.json", "dev.json", "test.json")


def bash(*args, cwd=ROOT):
    return subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def sample(tmp_path):
    if not all((SAMPLE / name).is_file() for name in SPLITS):
        pytest.skip(f"FinQA sample not found at {SAMPLE} (shared/ beside the repo)")
    copy = tmp_path / "sample"
    copy.mkdir()
    for name in SPLITS:
        shutil.copy(SAMPLE / name, copy / name)
    return copy


def test_download_from_folder_copies_all_splits(sample, tmp_path):
    dest = tmp_path / "finqa"
    run = bash("download.sh", "--from", str(sample), "--dest", str(dest))
    assert run.returncode == 0, run.stderr
    for name in SPLITS:
        assert (dest / name).read_bytes() == (sample / name).read_bytes()
    assert "100 examples" in run.stdout                          # each sample split holds 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_download_rejects_corrupt_json_and_leaves_nothing(sample, tmp_path):
    (sample / "dev.json").write_text('[{"id": "cut off mid-file"')
    dest = tmp_path / "finqa"
    run = bash("download.sh", "--from", str(sample), "--dest", str(dest))
    assert run.returncode != 0
    assert "dev.json is not valid JSON" in run.stderr
    assert not dest.exists()                                     # not even train.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]


def test_download_names_a_missing_file(sample, tmp_path):
    (sample / "test.json").unlink()
    run = bash("download.sh", "--from", str(sample), "--dest", str(tmp_path / "finqa"))
    assert run.returncode != 0 and "test.json is missing" in run.stderr
    assert not (tmp_path / "finqa").exists()


def test_activate_must_be_sourced():
    run = bash("activate.sh")
    assert run.returncode != 0
    assert "source activate.sh" in run.stderr


@pytest.mark.parametrize("script", ["setup.sh", "download.sh"])
def test_help_and_unknown_options(script):
    assert bash(script, "--help").stdout.startswith("Usage:")
    run = bash(script, "--no-such-flag")
    assert run.returncode != 0 and "--no-such-flag" in run.stderr
