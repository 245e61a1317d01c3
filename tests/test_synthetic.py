"""utils/synthetic.py: deterministic, executable, covering every op, usable in every context mode."""
from collections import Counter

import pytest

from utils.data import CONTEXT_MODES, build_context, to_processed, validate_example
from utils.finqa_program import OPS, exec_correct, tokenize
from utils.synthetic import generate


@pytest.fixture(scope="module")
def examples():
    splits = generate(200, seed=0)
    return [raw for split in ("train", "dev", "test") for raw in splits[split]]


def test_same_seed_same_output_other_seed_other_output():
    assert generate(30, seed=1) == generate(30, seed=1)
    assert generate(30, seed=1) != generate(30, seed=2)


def test_split_sizes_and_unique_ids(examples):
    splits = generate(200, seed=0)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 160, "dev": 20, "test": 20}
    ids = [raw["id"] for raw in examples]
    assert len(set(ids)) == 200 and ids[0] == "synthetic-000000"


def test_every_gold_program_executes_to_exe_ans(examples):
    for raw in examples:
        assert exec_correct(raw["qa"]["program"], raw["table"], raw["qa"]["exe_ans"]), raw["id"]


def test_op_coverage(examples):
    ops = Counter(token[:-1] for raw in examples for token in tokenize(raw["qa"]["program"])
                  if token.endswith("("))
    assert set(OPS) - {"exp"} <= set(ops), ops
    steps = Counter(len(raw["qa"]["steps"]) for raw in examples)
    assert set(steps) == {1, 2, 3}


def test_examples_have_the_official_schema(examples):
    assert [validate_example(raw) for raw in examples] == [[]] * len(examples)


def test_needed_numbers_are_in_the_retrieved_context(examples):
    for raw in examples:
        context = build_context(raw, "retrieved")
        for step in raw["qa"]["steps"]:
            for arg in (step["arg1"], step["arg2"]):
                if not arg.startswith(("#", "const_")) and arg != "none":
                    assert arg in context, (raw["id"], arg)
        assert all(fact in context for fact in raw["qa"]["gold_inds"].values())


def test_steps_agree_with_program(examples):
    for raw in examples:
        qa = raw["qa"]
        assert ", ".join(f"{s['op']}({s['arg1']}, {s['arg2']})" for s in qa["steps"]) == qa["program"]


def test_program_re_nests_the_steps():
    qa = generate(1, seed=0)["train"][0]["qa"]
    if len(qa["steps"]) == 1:
        assert qa["program_re"] == qa["program"]
    else:
        assert qa["program_re"].count("(") == len(qa["steps"])


@pytest.mark.parametrize("mode", CONTEXT_MODES)
def test_every_context_mode_works(examples, mode):
    row = to_processed(examples[0], "train", mode, source="synthetic")
    assert row["context"] and row["source"] == "synthetic"


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (-0.1, 0.6, 0.5)])
def test_bad_split_fractions(fractions):
    with pytest.raises(ValueError, match="split_fractions"):
        generate(10, seed=0, split_fractions=fractions)


# --- the difficulty ladder ---
@pytest.mark.parametrize("levels", [(1,), (2,), (3,), (1, 2), (1, 2, 3)])
def test_levels_give_programs_of_that_many_steps(levels):
    splits = generate(120, seed=3, levels=levels)
    rows = [raw for split in splits.values() for raw in split]
    assert {raw["qa"]["level"] for raw in rows} == set(levels)  # every level asked for, no other
    for raw in rows:
        assert raw["qa"]["level"] == len(raw["qa"]["steps"]) == \
            sum(t.endswith("(") for t in tokenize(raw["qa"]["program"]))
        assert exec_correct(raw["qa"]["program"], raw["table"], raw["qa"]["exe_ans"]), raw["id"]
        assert validate_example(raw) == []


def test_level_templates_cover_what_each_rung_promises():
    rows = [raw for split in generate(400, seed=0, levels=(1, 2, 3)).values() for raw in split]
    ops = {level: Counter(t[:-1] for raw in rows if raw["qa"]["level"] == level
                          for t in tokenize(raw["qa"]["program"]) if t.endswith("("))
           for level in (1, 2, 3)}
    assert {"add", "subtract", "multiply", "divide"} <= set(ops[1]) and {"table_max", "table_min"} & set(ops[1])
    assert {"add", "subtract", "divide"} <= set(ops[2])       # percent change, average of two, a constant
    assert {"greater", "table_max", "table_min", "exp"} <= set(ops[3])
    shares = Counter(raw["qa"]["level"] for raw in rows)
    assert all(100 < shares[level] < 170 for level in (1, 2, 3)), shares  # equal shares of 400


def test_one_step_questions_keep_distractor_facts():
    for raw in generate(60, seed=5, levels=(1,))["train"]:
        facts = raw["qa"]["model_input"]
        assert len(facts) == 3 and len([k for k, _ in facts if k not in raw["qa"]["gold_inds"]]) >= 1


def test_without_levels_the_mix_is_unchanged_and_records_step_counts():
    mix = generate(50, seed=1)
    assert generate(50, seed=1, levels=None) == mix
    assert all(raw["qa"]["level"] == len(raw["qa"]["steps"]) for split in mix.values() for raw in split)


@pytest.mark.parametrize("levels", [(), (0,), (4,), (1, 5)])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        generate(10, seed=0, levels=levels)


def test_processed_rows_record_their_level():
    raw = generate(10, seed=2, levels=(2,))["train"][0]
    assert to_processed(raw, "train", "retrieved", source="synthetic")["level"] == 2
