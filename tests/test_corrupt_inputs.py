"""Corrupt inputs, one table row per case: every numbered script, given a broken input file, exits with 2
and one `error:` line on stderr naming the file (and the line or field) and the fix, never a traceback, and
leaves no output a later stage would read (only manifest.json, with status "failed").

Each case starts from valid inputs, built once per session (`valid_inputs`): synthetic FinQA files and their
processed JSONL, a reward spec, model and algorithm YAML, candidates/scores, pairs, a tiny LoRA checkpoint and
a tiny full model (built only when a checkpoint case runs), and a copy of tests/fixtures/compare's
evaluations. A case copies the folders its command names, breaks one file (the corruption is the only
fault) and runs the script with the flags that reach that file first.

Covered (input: corruptions; "ok" = tolerated by design, the case asserts success and says why):
    raw FinQA JSON (01):      empty, truncated, not UTF-8, not a list, wrong type, missing field, NaN,
                              unknown field (ok), huge line; 00 (the checker): truncated, NaN (reported)
    processed JSONL (10):     truncated, not UTF-8, wrong type, missing field, NaN, inf, unknown field (ok),
                              huge line; 03, 04, 05, 06, 07 (training and candidate stages): empty,
                              truncated, not UTF-8, wrong type, missing field, NaN, unknown field (moves on)
    predictions (10):         empty, truncated, not UTF-8, wrong type, huge line
    reward_spec.yaml (02, 10): empty, truncated, not UTF-8, wrong type, unknown key, missing key, NaN, inf,
                              huge line
    model / algorithm YAML:   empty, truncated, not UTF-8, wrong type, unknown key, missing key, NaN, inf,
                              huge line
    candidates / scores (08): missing, empty, truncated, cut at a line end, not UTF-8, wrong type, missing
                              field, NaN, inf, unknown field (ok), huge line
    pairs.jsonl (09):         truncated, not UTF-8, wrong type, missing field, NaN in a field 09 does not
                              read (moves on)
    checkpoint (10, 04):      weights file missing (adapter, full model), truncated weights,
                              adapter_config.json truncated or of the wrong type
    metrics.json (11):        truncated, not UTF-8, not an object, wrong type, missing field, NaN,
                              unknown field (ok), huge line
    breakdown.csv (11):       missing (ok), empty, truncated, not UTF-8, wrong type, missing column, NaN,
                              unknown column (ok), huge line

What is accepted, by design: fields a JSONL or JSON record does not need (records are extensible: each
reader takes its fields, so a NaN in a field 09 never reads is no error either); a missing breakdown.csv
(it only feeds 11's paired tests). Never: an unknown key in a YAML config or reward spec, a missing or
mistyped field that is read, a NaN or infinite number where a number is read.

A training stage's case also points its next input at a missing file (--val_jsonl, or --policy_ckpt for 04):
an input it wrongly accepts then fails on that file, never loading a model. Slow: about a minute for the
cases of the scripts that do not import torch, two to three more for those that do (03-07, 09, and 10 with
a checkpoint: several seconds each).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# next inputs that do not exist (see the module docstring)
NEXT_VAL, NEXT_CKPT = "{in}/next/val.jsonl", "{in}/next/checkpoint"
HUGE = 1_000_000  # characters of the huge line: nested brackets (JSON, YAML) or one CSV field


# --- valid inputs ------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def build_raw_and_processed(root: Path) -> None:
    """raw/{train,dev,test}.json (synthetic FinQA) and data/{train,val,test}.jsonl, data/predictions.jsonl."""
    from utils.data import to_processed
    from utils.synthetic import generate

    splits = generate(30, seed=0)
    for split, examples in splits.items():
        write_json(root / "raw" / f"{split}.json", examples)
        name = {"dev": "val"}.get(split, split)
        rows = [to_processed(raw, name, "retrieved", source="synthetic") for raw in examples]
        write_jsonl(root / "data" / f"{name}.jsonl", rows)
        if name == "test":
            write_jsonl(root / "data" / "predictions.jsonl",
                        [{"id": row["id"], "completion": row["completion"][0]["content"]} for row in rows])


def build_candidates(root: Path) -> None:
    """candidates/{candidates,scores}.jsonl as 04 writes them: three prompts, three candidates each."""
    prompts, scores = [], []
    for p in range(3):
        texts = [f'{{"program": "add({p}, {k})", "answer": "{p + k}"}}' for k in range(3)]
        prompts.append({"id": f"p{p}", "prompt": [{"role": "user", "content": f"question {p}"}],
                        "completions": texts, "num_tokens": [9, 9, 9]})
        scores += [{"id": f"p{p}", "candidate": k, "completion": text, "total": [1.3, 0.0, -0.2][k],
                    "exact_match": k == 0, "format_valid": k < 2, "category": "correct" if k == 0 else "wrong_value"}
                   for k, text in enumerate(texts)]
    write_jsonl(root / "candidates" / "candidates.jsonl", prompts)
    write_jsonl(root / "candidates" / "scores.jsonl", scores)


def build_pairs(root: Path) -> None:
    """pairs/pairs.jsonl as 08 writes it, on the processed train prompts."""
    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    write_jsonl(root / "pairs" / "pairs.jsonl", [
        {"id": row["id"], "prompt": row["prompt"], "chosen": row["completion"],
         "rejected": [{"role": "assistant", "content": "no idea"}], "reward_chosen": 1.3, "reward_rejected": -0.2,
         "margin": 1.5, "chosen_candidate": 0, "rejected_candidate": 1} for row in rows[:6]])


def build_configs(root: Path) -> None:
    from utils.rewards import RewardSpec, spec_to_yaml

    (root / "spec").mkdir(parents=True)
    (root / "spec" / "reward_spec.yaml").write_text(spec_to_yaml(RewardSpec()))
    (root / "config").mkdir()
    shutil.copy(REPO / "configs" / "models" / "smollm2-135m.yaml", root / "config" / "model.yaml")
    shutil.copy(REPO / "configs" / "algorithms" / "dpo.yaml", root / "config" / "dpo.yaml")
    shutil.copytree(REPO / "tests" / "fixtures" / "compare" / "run_cmp" / "10_evaluation",
                    root / "cmp" / "10_evaluation")


def build_checkpoints(root: Path) -> None:
    """model/: a tiny random full model; ckpt/: a LoRA adapter over it (as 03 saves one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fixtures.tiny_model import build_tiny_model

    base = build_tiny_model(root / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(root / "ckpt")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "ckpt")


@pytest.fixture(scope="session")
def valid_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid_inputs")
    build_raw_and_processed(root)
    build_candidates(root)
    build_pairs(root)
    build_configs(root)
    return root


@pytest.fixture(scope="session")
def valid_checkpoints(valid_inputs) -> Path:
    """Built on first use only: it imports torch, which the light cases never need."""
    build_checkpoints(valid_inputs)
    return valid_inputs


# --- corruptions: each edits one file and returns the facts the error must name ({line}, {field}) -------

def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def missing(path: Path) -> dict:
    path.unlink()
    return {}


def empty(path: Path) -> dict:
    path.write_bytes(b"")
    return {}


def truncated(path: Path) -> dict:
    """Cut in the middle of the file's middle line, as a writer killed mid-line leaves a file."""
    found = lines(path)
    middle = len(found) // 2
    path.write_bytes(b"".join(found[:middle]) + found[middle][:len(found[middle]) // 2])
    return {"line": middle + 1}


def halved(path: Path) -> dict:
    """The first half of a binary file (a weights file cut by a full disk)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return {}


def cut_at_line_end(path: Path) -> dict:
    """Drop the last line whole: every line left parses, but the file is short."""
    path.write_bytes(b"".join(lines(path)[:-1]))
    return {}


def not_utf8(path: Path) -> dict:
    """Bytes that are not UTF-8 in the middle of line 2."""
    found = lines(path)
    middle = len(found[1]) // 2
    found[1] = found[1][:middle] + b"\xff\xfe" + found[1][middle:]
    path.write_bytes(b"".join(found))
    return {"line": 2}


def huge_line(path: Path) -> dict:
    """A line 2 of HUGE characters: nested brackets (JSON, JSONL, YAML: deeper than any parser recurses) or,
    in a CSV, one field of that size."""
    found = lines(path)
    if path.suffix == ".csv":
        inserted = b"huge," + b"x" * HUGE + b"\n"
    elif path.suffix == ".yaml":
        inserted = b"zz_deep: " + b"[" * 5_000 + b"]" * 5_000 + b"\n"  # PyYAML recurses per level: slow
    else:
        inserted = b"[" * HUGE + b"]" * HUGE + b"\n"
    path.write_bytes(found[0] + inserted + b"".join(found[1:]))
    return {"line": 2}


def _edit(path: Path, row: int, edit: Callable[[dict], None]) -> dict:
    """Apply edit(record) to one record: row `row` of a JSONL, JSON list or CSV; a JSON or YAML mapping."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        edit(records[row])
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return {"line": row + 1, "id": records[row].get("id")}
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            records = list(csv.DictReader(handle))
        edit(records[row])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[row]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: record.get(key, "") for key in records[row]} for record in records)
        path.write_text(buffer.getvalue())
        return {"line": row + 2}  # the header is line 1
    if path.suffix == ".yaml":
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return {}
    data = json.loads(path.read_text())
    record = data[row] if isinstance(data, list) else data
    edit(record)
    path.write_text(json.dumps(data, indent=2))  # NaN and Infinity as Python's json writes them
    return {"id": record.get("id") if isinstance(data, list) else None}


def _walk(record: dict, dotted: str) -> tuple[dict, str]:
    *parents, key = dotted.split(".")
    for parent in parents:
        record = record[parent]
    return record, key


def set_field(field: str, value, row: int = 1):
    """Set a (dotted) field of record `row` to value: a wrong type, NaN, inf or an unknown field."""
    def corrupt(path: Path) -> dict:
        def edit(record):
            parent, key = _walk(record, field)
            parent[key] = value
        return {**_edit(path, row, edit), "field": field}
    return corrupt


def drop_field(field: str, row: int = 1):
    def corrupt(path: Path) -> dict:
        def edit(record):
            parent, key = _walk(record, field)
            del parent[key]
        return {**_edit(path, row, edit), "field": field}
    return corrupt


def rename_column(old: str, new: str):
    """A CSV header without a column the reader needs."""
    def corrupt(path: Path) -> dict:
        header, _, rest = path.read_text().partition("\n")
        path.write_text(header.replace(old, new) + "\n" + rest)
        return {}
    return corrupt


def on_sibling(name: str, corrupt: Callable[[Path], dict]):
    """Apply a corruption to another file of the target's folder (a checkpoint's adapter_config.json)."""
    return lambda path: corrupt(path.with_name(name))


def replace_with(text: str):
    """Replace the whole file: a valid document of the wrong shape (a list where an object belongs)."""
    def corrupt(path: Path) -> dict:
        path.write_text(text)
        return {}
    return corrupt


NAN, INF = float("nan"), float("inf")
UNKNOWN = "zz_unknown_field"


# --- what each case runs -----------------------------------------------------------------------------

class Target(NamedTuple):
    script: str
    flags: tuple      # {in}: the case's copy of the valid inputs
    file: str         # the file a case corrupts, relative to {in}
    fix: str | None   # text of the fix every error for this input names (None: the case lists it)
    allowed: tuple = ()  # output files a failed run may leave: reports no later stage reads
    named: str = "{file}"  # what every error names: the file, or for a checkpoint its {folder}


EVAL_DATA = ("--test_jsonl", "{in}/data/test.jsonl")
TARGETS = {
    "raw": Target("01_prepare_dataset.py", ("--data_root", "{in}/raw"), "raw/train.json", "download.sh"),
    "raw check": Target("00_check_data.py", ("--data_root", "{in}/raw", "--splits", "train", "--no_tokenizer"),
                        "raw/train.json", "download.sh", allowed=("summary.json", "samples.json")),
    "test_jsonl": Target("10_evaluate.py", (*EVAL_DATA, "--predictions", "{in}/data/predictions.jsonl"),
                         "data/test.jsonl", "01_prepare_dataset.py"),
    "predictions": Target("10_evaluate.py", (*EVAL_DATA, "--predictions", "{in}/data/predictions.jsonl"),
                          "data/predictions.jsonl", None),
    "sft train": Target("03_sft_train.py", ("--train_jsonl", "{in}/data/train.jsonl", "--val_jsonl", NEXT_VAL),
                        "data/train.jsonl", "01_prepare_dataset.py"),
    "candidates data": Target("04_generate_candidates.py", ("--data_dir", "{in}/data", "--policy_ckpt", NEXT_CKPT),
                              "data/train.jsonl", "01_prepare_dataset.py"),
    "ppo train": Target("05_train_ppo.py", ("--train_jsonl", "{in}/data/train.jsonl", "--val_jsonl", NEXT_VAL),
                        "data/train.jsonl", "01_prepare_dataset.py"),
    "grpo train": Target("06_train_grpo.py", ("--train_jsonl", "{in}/data/train.jsonl", "--val_jsonl", NEXT_VAL),
                         "data/train.jsonl", "01_prepare_dataset.py"),
    "rloo train": Target("07_train_rloo.py", ("--train_jsonl", "{in}/data/train.jsonl", "--val_jsonl", NEXT_VAL),
                         "data/train.jsonl", "01_prepare_dataset.py"),
    "spec": Target("02_build_rewards.py", ("--spec", "{in}/spec/reward_spec.yaml"), "spec/reward_spec.yaml",
                   "02_build_rewards.py"),
    "eval spec": Target("10_evaluate.py", (*EVAL_DATA, "--predictions", "{in}/data/predictions.jsonl",
                                           "--reward_spec", "{in}/spec/reward_spec.yaml"),
                        "spec/reward_spec.yaml", "02_build_rewards.py"),
    "model yaml": Target("02_build_rewards.py", ("--config", "{in}/config/model.yaml"), "config/model.yaml", None),
    "algo yaml": Target("08_build_prefs.py", ("--candidates_dir", "{in}/candidates", "--algo_config",
                                              "{in}/config/dpo.yaml"), "config/dpo.yaml", None),
    "candidates": Target("08_build_prefs.py", ("--candidates_dir", "{in}/candidates"),
                         "candidates/candidates.jsonl", "04_generate_candidates.py"),
    "scores": Target("08_build_prefs.py", ("--candidates_dir", "{in}/candidates"),
                     "candidates/scores.jsonl", "04_generate_candidates.py"),
    "pairs": Target("09_train_dpo.py", ("--pairs", "{in}/pairs/pairs.jsonl", "--val_jsonl", NEXT_VAL),
                    "pairs/pairs.jsonl", "08_build_prefs.py"),
    "eval adapter": Target("10_evaluate.py", (*EVAL_DATA, "--policy_ckpt", "{in}/ckpt", "--max_examples", "1",
                                              "--max_new_tokens", "2", "--bootstrap", "0"),
                           "ckpt/adapter_model.safetensors", "complete checkpoint", named="{folder}"),
    "eval model": Target("10_evaluate.py", (*EVAL_DATA, "--policy_ckpt", "{in}/model", "--max_examples", "1",
                                            "--max_new_tokens", "2", "--bootstrap", "0"),
                         "model/model.safetensors", "complete checkpoint", named="{folder}"),
    "candidates adapter": Target("04_generate_candidates.py", ("--data_dir", "{in}/data", "--policy_ckpt",
                                                               "{in}/ckpt", "--max_examples", "1"),
                                 "ckpt/adapter_model.safetensors", "complete checkpoint", named="{folder}"),
    "metrics": Target("11_compare_runs.py", ("{in}/cmp/10_evaluation", "--bootstrap", "50"),
                      "cmp/10_evaluation/sft/metrics.json", "10_evaluate.py"),
    "breakdown": Target("11_compare_runs.py", ("{in}/cmp/10_evaluation", "--bootstrap", "50"),
                        "cmp/10_evaluation/sft/breakdown.csv", "10_evaluate.py"),
}

ERROR, OK, MOVES_ON = "error", "ok", "moves on"


class Case(NamedTuple):
    target: str                 # a TARGETS key
    corruption: str             # its name in the test id
    corrupt: Callable[[Path], dict]
    expect: tuple = ()          # ERROR: texts the error line names besides the file and the target's fix,
    #                             formatted with the corruption's facts; OK: files the run writes
    outcome: str = ERROR        # OK, MOVES_ON: tolerated by design (the comment on the case says why)

    @property
    def id(self) -> str:
        return f"{TARGETS[self.target].script[:2]}-{self.target}-{self.corruption}".replace(" ", "_")


def ok(target, corruption, corrupt, *writes):
    """Accepted: the script exits 0 and writes these files (`file` or `file:text it holds`)."""
    return Case(target, corruption, corrupt, writes, OK)


def moves_on(target, corruption, corrupt):
    """Accepted by a training stage: it goes on to its next input, which is missing (module docstring)."""
    return Case(target, corruption, corrupt, (), MOVES_ON)


CASES = [
    # raw FinQA JSON (a JSON list of examples)
    Case("raw", "empty", empty, ("line 1",)),
    Case("raw", "truncated", truncated, ("line {line}",)),
    Case("raw", "not utf8", not_utf8, ("UTF-8",)),
    Case("raw", "not a list", replace_with('{"id": "x"}'), ("JSON list",)),
    Case("raw", "wrong type", set_field("qa.exe_ans", [1, 2]), ("{id}", "qa.exe_ans")),
    Case("raw", "missing field", drop_field("qa.program"), ("{id}", "qa.program")),
    Case("raw", "nan", set_field("qa.exe_ans", NAN), ("{id}", "qa.exe_ans")),
    # FinQA examples carry many fields 01 never reads (explanation, steps, tfidftopn...)
    ok("raw", "unknown field", set_field(UNKNOWN, "x"), "train.jsonl", "val.jsonl", "test.jsonl"),
    Case("raw", "huge line", huge_line, ()),
    Case("raw check", "truncated", truncated, ("line {line}",)),
    # 00 is the checker: it lists every problem of every example in summary.json rather than stop at one
    ok("raw check", "nan", set_field("qa.exe_ans", NAN), "summary.json:qa.exe_ans"),
    # processed JSONL
    Case("test_jsonl", "truncated", truncated, ("line {line}",)),
    Case("test_jsonl", "not utf8", not_utf8, ("line {line}",)),
    Case("test_jsonl", "wrong type", set_field("table", "revenue 1200"), ("line {line}", "table")),
    Case("test_jsonl", "missing field", drop_field("target_program"), ("line {line}", "target_program")),
    Case("test_jsonl", "nan", set_field("exe_ans", NAN), ("line {line}", "exe_ans")),
    Case("test_jsonl", "inf", set_field("exe_ans", -INF), ("line {line}", "exe_ans")),
    # processed rows are extensible records: a reader takes the fields it needs
    ok("test_jsonl", "unknown field", set_field(UNKNOWN, 1), "metrics.json"),
    Case("test_jsonl", "huge line", huge_line, ("line {line}",)),
    Case("sft train", "wrong type", set_field("completion", "the answer"), ("line {line}", "completion")),
    Case("candidates data", "empty", empty, ("no examples",)),
    Case("candidates data", "wrong type", set_field("exe_ans", {"value": 1}), ("line {line}", "exe_ans")),
    Case("ppo train", "missing field", drop_field("exe_ans"), ("line {line}", "exe_ans")),
    Case("grpo train", "truncated", truncated, ("line {line}",)),
    Case("grpo train", "not utf8", not_utf8, ("line {line}",)),
    Case("grpo train", "nan", set_field("exe_ans", NAN), ("line {line}", "exe_ans")),
    # accepted (extensible records): the run moves on and stops at its next input, the missing --val_jsonl
    moves_on("grpo train", "unknown field", set_field(UNKNOWN, 1)),
    Case("rloo train", "wrong type", set_field("prompt", "what was revenue?"), ("line {line}", "prompt")),
    # predictions of 10 (JSONL of {"id", "completion"})
    Case("predictions", "empty", empty, ("no predictions",)),
    Case("predictions", "truncated", truncated, ("line {line}",)),
    Case("predictions", "not utf8", not_utf8, ("line {line}",)),
    Case("predictions", "wrong type", set_field("completion", 42), ("line {line}",)),
    Case("predictions", "huge line", huge_line, ("line {line}",)),
    # reward_spec.yaml
    Case("spec", "empty", empty, ("empty",)),
    Case("spec", "truncated", truncated, ()),
    Case("spec", "not utf8", not_utf8, ()),
    Case("spec", "wrong type", set_field("weights.exact", "high"), ("exact",)),
    Case("spec", "unknown key", set_field(f"weights.{UNKNOWN}", 1.0), (UNKNOWN,)),
    Case("spec", "missing key", drop_field("weights.numeric"), ("numeric",)),
    Case("spec", "nan", set_field("weights.format", NAN), ("format",)),
    Case("spec", "huge line", huge_line, ()),
    Case("eval spec", "inf", set_field("numeric_rel_tol", INF), ("numeric_rel_tol",)),
    # model and algorithm YAML
    Case("model yaml", "empty", empty, ("empty",)),
    Case("model yaml", "truncated", truncated, ("model",)),
    Case("model yaml", "not utf8", not_utf8, ("UTF-8",)),
    Case("model yaml", "wrong type", set_field("training.max_steps", "many"), ("training.max_steps",)),
    Case("model yaml", "unknown key", set_field(f"lora.{UNKNOWN}", 1), (f"lora.{UNKNOWN}",)),
    Case("model yaml", "missing key", drop_field("training.seed"), ("training.seed",)),
    Case("model yaml", "nan", set_field("training.learning_rate", NAN), ("training.learning_rate",)),
    Case("model yaml", "huge line", huge_line, ()),
    Case("algo yaml", "inf", set_field("algorithm.beta", INF), ("algorithm.beta",)),
    # candidates.jsonl and scores.jsonl of 04
    Case("scores", "missing", missing, ("not found",)),
    Case("candidates", "empty", empty, ("no prompts",)),
    Case("scores", "empty", empty, ("no scored candidates",)),
    Case("scores", "truncated", truncated, ("line {line}",)),
    Case("scores", "cut at a line end", cut_at_line_end, ("p2",)),
    Case("scores", "not utf8", not_utf8, ("line {line}",)),
    Case("scores", "wrong type", set_field("total", "high"), ("line {line}", "total")),
    Case("scores", "missing field", drop_field("exact_match"), ("line {line}", "exact_match")),
    Case("scores", "nan", set_field("total", NAN), ("line {line}", "total")),
    Case("scores", "inf", set_field("total", INF), ("line {line}", "total")),
    # 04 writes every RewardResult field to scores.jsonl; 08 reads the ones it ranks by
    ok("scores", "unknown field", set_field(UNKNOWN, 1), "pairs.jsonl"),
    Case("scores", "huge line", huge_line, ("line {line}",)),
    Case("candidates", "wrong type", set_field("completions", "one text"), ("line {line}", "completions")),
    Case("candidates", "missing field", drop_field("id"), ("line {line}", "id")),
    # pairs.jsonl of 08
    Case("pairs", "truncated", truncated, ("line {line}",)),
    Case("pairs", "not utf8", not_utf8, ("line {line}",)),
    Case("pairs", "wrong type", set_field("chosen", 1.3), ("line {line}", "chosen")),
    Case("pairs", "missing field", drop_field("rejected"), ("line {line}", "rejected")),
    # 09 reads id, prompt, chosen and rejected only (the margins are 08's record): it moves on to --val_jsonl
    moves_on("pairs", "nan", set_field("margin", NAN)),
    # checkpoint folders
    Case("eval adapter", "weights missing", missing, ("adapter_model.safetensors",)),
    Case("eval adapter", "weights truncated", halved, ("adapter_model.safetensors",)),
    Case("eval adapter", "config truncated", on_sibling("adapter_config.json", truncated), ("adapter_config.json",)),
    Case("eval adapter", "config wrong type",
         on_sibling("adapter_config.json", set_field("base_model_name_or_path", 7)),
         ("adapter_config.json", "base_model_name_or_path")),
    Case("eval model", "weights missing", missing, ("model.safetensors",)),
    Case("candidates adapter", "weights missing", missing, ("adapter_model.safetensors",)),
    # metrics.json and breakdown.csv of 10, read by 11
    Case("metrics", "truncated", truncated, ("line {line}",)),
    Case("metrics", "not utf8", not_utf8, ()),
    Case("metrics", "not an object", replace_with("[0.5]"), ("object",)),
    Case("metrics", "wrong type", set_field("exec_acc", "high"), ("exec_acc",)),
    Case("metrics", "missing field", drop_field("reward_mean"), ("reward_mean",)),
    Case("metrics", "nan", set_field("format_rate", NAN), ("format_rate",)),
    # metrics.json gains fields as 10 grows: 11 reads the ones it reports
    ok("metrics", "unknown field", set_field(UNKNOWN, 1), "summary.csv"),
    Case("metrics", "huge line", huge_line, ()),
    # breakdown.csv only feeds the paired tests: a policy without one is summarised, with a warning
    ok("breakdown", "missing", missing, "summary.csv"),
    Case("breakdown", "empty", empty, ()),
    Case("breakdown", "truncated", truncated, ("line {line}",)),
    Case("breakdown", "not utf8", not_utf8, ()),
    Case("breakdown", "wrong type", set_field("exec_correct", "maybe"), ("line {line}", "exec_correct")),
    Case("breakdown", "missing column", rename_column("exec_correct", "exec_ok"), ("exec_correct",)),
    Case("breakdown", "nan", set_field("reward", "nan"), ("line {line}", "reward")),
    # 10 writes more columns than 11 reads (predicted_program, category...)
    ok("breakdown", "unknown column", set_field(UNKNOWN, "1"), "summary.csv"),
    Case("breakdown", "huge line", huge_line, ("line {line}",)),
]


# --- running a case ---------------------------------------------------------------------------------

def input_folders(target: Target) -> set[str]:
    """The top-level folders of the valid inputs that a target's command reads."""
    parts = (*target.flags, "{in}/" + target.file)
    return {part.split("/")[1] for part in parts if part.startswith("{in}/")} - {"next"}  # next/: never made


def copy_inputs(target: Target, valid: Path, dest: Path) -> Path:
    for folder in input_folders(target):
        shutil.copytree(valid / folder, dest / folder)
    return dest


def run_script(target: Target, inputs: Path, out: Path) -> subprocess.CompletedProcess:
    flags = [flag.replace("{in}", str(inputs)) for flag in target.flags]
    command = [sys.executable, target.script, *flags, "--run_id", "pytest", "--output_dir", str(out / "out"),
               "--paths.output_root", str(out / "outputs")]
    # the libraries' progress bars and warnings off (a checkpoint case loads a model before it fails): what
    # is checked is the script's own report
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out / "hf_datasets")}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def assert_one_error_line(done: subprocess.CompletedProcess, expected: list[str]) -> None:
    """Exit 2; stderr is exactly one line, `error: ...`, naming every expected text; no traceback."""
    stderr = done.stderr
    assert done.returncode == 2, f"exit {done.returncode}\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    found = [line for line in stderr.splitlines() if line.strip()]
    assert len(found) == 1 and found[0].startswith("error: "), stderr[-4000:]
    assert len(found[0]) < 2000, "the error repeats the input: " + found[0][:300]
    missing_texts = [text for text in expected if text not in found[0]]
    assert not missing_texts, f"{missing_texts} not in: {found[0]}"


def assert_no_partial_output(target: Target, out: Path) -> None:
    """Nothing a later stage would read: only manifest.json (status "failed") and the target's reports."""
    written = [path for folder in (out / "out", out / "outputs") for path in folder.rglob("*") if path.is_file()]
    for path in sorted(written):
        if path.name == "manifest.json":
            assert json.loads(path.read_text())["status"] == "failed", path
        else:
            assert path.name in target.allowed, f"a failed run left {path}"


def assert_success(done: subprocess.CompletedProcess, writes: tuple, out: Path) -> None:
    """Exit 0 and each `file` or `file:text` written (under out/out) and holding the text."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    for item in writes:
        name, _, text = item.partition(":")
        found = list((out / "out").rglob(name))
        assert found, f"{name} not written"
        assert text in found[0].read_text(), f"{text!r} not in {found[0]}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_corrupt_input(case: Case, valid_inputs, request, tmp_path):
    target = TARGETS[case.target]
    needs_checkpoint = bool(input_folders(target) & {"ckpt", "model"})
    valid = request.getfixturevalue("valid_checkpoints") if needs_checkpoint else valid_inputs
    inputs = copy_inputs(target, valid, tmp_path / "in")
    file = inputs / target.file
    facts = case.corrupt(file)
    done = run_script(target, inputs, tmp_path)
    if case.outcome == OK:
        assert_success(done, case.expect, tmp_path)
        return
    named = [target.named, *([target.fix] if target.fix else []), *case.expect]
    if case.outcome == MOVES_ON:
        named = [next_input for next_input in (NEXT_VAL, NEXT_CKPT) if next_input in target.flags]
    assert_one_error_line(done, [text.replace("{in}", str(inputs)).format(file=file, folder=file.parent, **facts)
                                 for text in named])
    assert_no_partial_output(target, tmp_path)


def test_every_case_id_is_unique_and_every_target_is_used():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert {case.target for case in CASES} == set(TARGETS)
