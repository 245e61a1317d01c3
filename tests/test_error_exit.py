"""One error exit (utils.cli.run): every numbered script and inspect_model_architecture.py, given a
misspelled config key or a missing input, exits with 2 and one line on stderr that names the key
or file, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MISSING = "/nonexistent/finqa_input"

# (script, flags naming a missing input, the text the error must name)
MISSING_INPUT = [
    ("00_check_data.py", ["--data_root", MISSING, "--no_tokenizer"], MISSING),
    ("01_prepare_dataset.py", ["--data_root", MISSING], MISSING),
    ("02_build_rewards.py", ["--spec", f"{MISSING}/reward_spec.yaml"], f"{MISSING}/reward_spec.yaml"),
    ("03_sft_train.py", ["--train_jsonl", f"{MISSING}/train.jsonl"], f"{MISSING}/train.jsonl"),
    ("04_generate_candidates.py", ["--data_dir", MISSING], f"{MISSING}/train.jsonl"),
    ("05_train_ppo.py", ["--train_jsonl", f"{MISSING}/train.jsonl"], f"{MISSING}/train.jsonl"),
    ("06_train_grpo.py", ["--train_jsonl", f"{MISSING}/train.jsonl"], f"{MISSING}/train.jsonl"),
    ("07_train_rloo.py", ["--train_jsonl", f"{MISSING}/train.jsonl"], f"{MISSING}/train.jsonl"),
    ("08_build_prefs.py", ["--candidates_dir", MISSING], MISSING),
    ("09_train_dpo.py", ["--pairs", f"{MISSING}/pairs.jsonl"], f"{MISSING}/pairs.jsonl"),
    ("10_evaluate.py", ["--test_jsonl", f"{MISSING}/test.jsonl"], f"{MISSING}/test.jsonl"),
    ("11_compare_runs.py", [f"{MISSING}/metrics.json"], f"{MISSING}/metrics.json"),
    ("12_driver.py", ["--method", "grpo", "--algo_config", f"{MISSING}/grpo.yaml"], f"{MISSING}/grpo.yaml"),
    ("inspect_model_architecture.py", ["--model", MISSING, "--no_config"], MISSING),
]
SCRIPTS = [script for script, _, _ in MISSING_INPUT]


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, script, *args]
    if script not in ("11_compare_runs.py", "inspect_model_architecture.py", "12_driver.py"):
        command += ["--output_dir", str(tmp_path / "out")]  # nothing lands in the repository's outputs/
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_error_line(done: subprocess.CompletedProcess, named: str) -> None:
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_misspelled_config_key(script, tmp_path):
    if script == "inspect_model_architecture.py":  # no config: a misspelled flag instead
        done, named = run(script, "--modle", "smollm2-135m", tmp_path=tmp_path), "--modle"
    elif script in ("06_train_grpo.py", "07_train_rloo.py"):
        done, named = run(script, "--algorithm.bta", "0.1", tmp_path=tmp_path), "--algorithm.bta"
    else:
        extra = ["x/metrics.json"] if script == "11_compare_runs.py" else []
        done, named = run(script, *extra, "--training.learnin_rate", "1e-5", tmp_path=tmp_path), "learnin_rate"
    assert_one_error_line(done, named)
    if script != "inspect_model_architecture.py":
        assert "did you mean" in done.stderr  # and the close matches, to fix it


@pytest.mark.slow
@pytest.mark.parametrize("script, args, named", MISSING_INPUT, ids=SCRIPTS)
def test_missing_input(script, args, named, tmp_path):
    assert_one_error_line(run(script, *args, tmp_path=tmp_path), named)


@pytest.mark.slow
def test_processed_file_without_the_reward_columns(tmp_path):
    """An input that exists but is not a processed split (no table, exe_ans...) is a usage error too."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "a", "prompt": [{"role": "user", "content": "q"}]}\n')
    done = run("06_train_grpo.py", "--train_jsonl", str(train), tmp_path=tmp_path)
    assert_one_error_line(done, str(train))
    assert "line 1 lacks table, exe_ans" in done.stderr and "01_prepare_dataset.py" in done.stderr
