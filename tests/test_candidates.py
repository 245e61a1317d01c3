"""04_generate_candidates.py run as a subprocess on a tiny random model and three hand-written examples."""
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from utils.data import build_prompt, canonical_response
from utils.runs import atomic_write_jsonl, sha256_file

REPO = Path(__file__).resolve().parents[1]
TABLE = [["", "2018", "2017"], ["revenue", "$ 5,829", "$ 5,735"]]
EXAMPLES = [  # (id, question, gold program, exe_ans, answer text)
    ("ex-0", "what was the change in revenue ?", "subtract(5829, 5735)", 94.0, "94"),
    ("ex-1", "what was the growth rate of revenue ?", "subtract(5829, 5735), divide(#0, 5735)", 0.01639, "1.6%"),
    ("ex-2", "was revenue higher in 2018 ?", "greater(5829, 5735)", "yes", "yes"),
]


def run(*args, tmp_path):
    """Run 04 from the repo root; run folders (if any) go under tmp_path/outputs."""
    command = [sys.executable, "04_generate_candidates.py", *map(str, args),
               "--run_id", "pytest", "--paths.output_root", str(tmp_path / "outputs")]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processed")
    rows = [{"id": id_, "split": "train", "prompt": build_prompt(question, "revenue : $ 5,829 ; $ 5,735"),
             "completion": [{"role": "assistant", "content": canonical_response(program, answer)}],
             "table": TABLE, "exe_ans": exe_ans, "target_program": program, "target_answer": answer}
            for id_, question, program, exe_ans, answer in EXAMPLES]
    atomic_write_jsonl(folder / "train.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, data_dir):
    from tests.fixtures.tiny_model import build_tiny_model
    tmp = tmp_path_factory.mktemp("candidates")
    model = build_tiny_model(tmp / "tiny")
    out = tmp / "out"
    done = run("--policy_ckpt", model, "--data_dir", data_dir, "--num_candidates", 2, "--max_new_tokens", 8,
               "--output_dir", out, tmp_path=tmp)
    assert done.returncode == 0, done.stderr
    return out, model, done


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_candidates_file(candidates):
    out, _, _ = candidates
    rows = _jsonl(out / "candidates.jsonl")
    assert [row["id"] for row in rows] == ["ex-0", "ex-1", "ex-2"]   # input order
    assert all(len(row["completions"]) == 2 and len(row["num_tokens"]) == 2 for row in rows)
    assert all(1 <= n <= 8 for row in rows for n in row["num_tokens"])
    assert rows[0]["prompt"][0]["role"] == "system"                  # the chat messages, as given


def test_scores_and_stats_agree(candidates):
    out, _, _ = candidates
    scores = _jsonl(out / "scores.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    assert len(scores) == 6
    assert [(s["id"], s["candidate"]) for s in scores[:2]] == [("ex-0", 0), ("ex-0", 1)]
    assert {"total", "exact", "format_valid", "exec_correct", "category", "completion"} <= set(scores[0])
    by_prompt = defaultdict(list)
    for s in scores:
        by_prompt[s["id"]].append(s["exec_correct"])
    assert stats["n_prompts"] == 3 and stats["n_candidates"] == 6 and stats["k"] == 2
    assert stats["parse_rate"] == pytest.approx(sum(s["format_valid"] for s in scores) / 6)
    assert stats["reward_mean"] == pytest.approx(statistics.fmean(s["total"] for s in scores))
    assert stats["pass@k"] == pytest.approx(statistics.fmean(any(c) for c in by_prompt.values()))
    assert stats["pass@1"] == pytest.approx(statistics.fmean(sum(c) / 2 for c in by_prompt.values()))
    rows = _jsonl(out / "candidates.jsonl")
    assert stats["tokens_generated"] == sum(sum(row["num_tokens"]) for row in rows)
    assert 1 <= stats["distinct_completions_per_prompt"] <= 2
    assert 0 <= stats["json_parse_rate"] <= 1 and stats["wall_time_s"] > 0


def test_manifest(candidates, data_dir):
    out, model, _ = candidates
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["module"] == "04_candidates" and manifest["status"] == "complete"
    assert manifest["inputs"]["data"]["sha256"] == sha256_file(data_dir / "train.jsonl")
    assert manifest["inputs"]["checkpoint"]["path"] == str(model)
    assert set(manifest["outputs"]) == {"candidates", "scores", "stats"}
    assert manifest["metrics"] == json.loads((out / "stats.json").read_text())
    assert manifest["metrics"]["reward_spec"] == "built-in defaults"  # no 02_rewards in this run
    assert manifest["config"]["generation"]["num_candidates"] == 2       # the values actually used
    assert manifest["config"]["generation"]["max_new_tokens"] == 8


def test_missing_data_file(tmp_path):
    done = run("--data_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out", tmp_path=tmp_path)
    assert done.returncode != 0
    assert str(tmp_path / "nowhere" / "train.jsonl") in done.stderr
    assert "01_prepare_dataset.py" in done.stderr


def test_missing_checkpoint_lists_folder(tmp_path, data_dir):
    (tmp_path / "03_sft" / "logs").mkdir(parents=True)
    done = run("--policy_ckpt", tmp_path / "03_sft", "--data_dir", data_dir, "--output_dir", tmp_path / "out",
               tmp_path=tmp_path)
    assert done.returncode != 0
    assert str(tmp_path / "03_sft") in done.stderr and "logs/" in done.stderr
