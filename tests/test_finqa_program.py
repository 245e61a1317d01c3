"""The FinQA DSL against hand-computed values and the official scorer's corner cases."""
import json
from pathlib import Path

import pytest

from utils.finqa_program import (equivalent, exec_correct, execute, program_steps, str_to_num,
                                 tokenize)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "finqa-sample"
TABLE = [
    ["", "2019", "2020", "2021"],
    ["revenue", "$ 1,000", "2,000 ( 5% )", "$ 3000"],
    ["margin", "10%", "20%", "30%"],
    ["notes", "n/a", "5", "6"],
    ["empty"],
]


@pytest.mark.parametrize("text, expected", [
    ("1,234", 1234.0),        # commas removed
    ("5%", 0.05),             # percent -> fraction
    ("-3.5", -3.5),
    ("const_100", 100.0),
    ("const_m1", -1.0),       # the one negative constant
    ("const_x", None),        # malformed constant
    ("$ 3", None),            # "$" only allowed in table cells, as in the official scorer
    ("abc", None),
])
def test_str_to_num(text, expected):
    assert str_to_num(text) == expected


def test_tokenize_matches_official_format():
    assert tokenize("subtract(5829, 5735), divide(#0, 5735)") == [
        "subtract(", "5829", "5735", ")", "divide(", "#0", "5735", ")", "EOF"]
    assert tokenize("") == ["EOF"]


@pytest.mark.parametrize("program, expected", [
    ("subtract(5829, 5735), divide(#0, 5735)", 0.01639),   # 94 / 5735 = 0.0163905...
    ("add(1,234, 766)", 2000.0),                # only ", " separates arguments: "1,234" is one number
    ("add(1234, 766)", 2000.0),
    ("multiply(5%, 200)", 10.0),
    ("divide(1, 3)", 0.33333),                  # rounded to 5 decimals at the end
    ("divide(1, 3), multiply(#0, 3)", 1.0),     # intermediate results are not rounded
    ("exp(2, 10)", 1024.0),
    ("exp(10, 400)", None),                     # float overflow -> invalid, not a hang
    ("divide(5, 0)", None),                     # division by zero -> invalid
    ("greater(5, 3)", "yes"),
    ("greater(3, 5)", "no"),
    ("greater(3, 5), add(#0, 1)", None),        # arithmetic on "no" -> invalid
    ("add(const_100, const_m1)", 99.0),
    ("add(#1, 1)", None),                       # reference to a later step
    ("add(1, 2), add(#0, #0), multiply(#1, #0)", 18.0),
    ("table_sum(revenue, none)", 6000.0),       # "$ 1,000" and "2,000 ( 5% )" parse as in the official
    ("table_max(revenue, none)", 3000.0),
    ("table_min(margin, none)", 0.1),
    ("table_average(margin, none)", 0.2),
    ("table_sum(notes, none)", None),           # a non-numeric cell
    ("table_sum(missing row, none)", None),
    ("table_sum(empty, none)", 0.0),            # empty row sums to 0, as Python's sum([])
    ("table_average(empty, none)", None),       # ... and averages to a division by zero
    ("foo(1, 2)", None),                        # unknown op
    ("add(1)", None),                           # missing argument
    ("add(1, 2), ", 3.0),                       # trailing junk after the last step is ignored
    ("", None),                                 # nothing to execute
    ("add(1, 2", None),
    ("exp(-8, 0.5)", None),                     # complex result -> invalid
    ("add(inf, 1)", None),                      # non-finite never matches
])
def test_execute(program, expected):
    assert execute(program, TABLE) == expected


def test_execute_rejects_non_strings():
    assert execute(None, TABLE) is None
    assert execute(12, TABLE) is None


def test_exec_correct_uses_exact_equality_after_rounding():
    assert exec_correct("divide(114400, 329500)", [], 0.34719)
    assert not exec_correct("divide(114400, 329500)", [], 0.347)
    assert exec_correct("greater(2, 1)", [], "yes")
    assert not exec_correct("divide(1, 0)", [], 0.0)


@pytest.mark.parametrize("pred, gold, expected", [
    ("add(2, 3)", "add(3, 2)", True),                               # commutative
    ("subtract(2, 3)", "subtract(3, 2)", False),
    ("multiply(2, 3), divide(#0, 4)", "divide(2, 4), multiply(#0, 3)", True),  # same expression
    ("subtract(5829, 5735), divide(#0, 5735)", "subtract(5829, 5735), divide(#0, 5735)", True),
    ("divide(5829, 5735), subtract(#0, const_1)", "subtract(5829, 5735), divide(#0, 5735)", False),  # const_1 not in gold
    ("add(2, 4)", "add(2, 3)", False),                              # argument not in gold
    ("add(#1, 2), add(2, 3)", "add(2, 3), add(#0, 2)", False),      # forward reference
    ("table_max(revenue, none)", "table_max(revenue, none)", True),
    ("add(1, 1), table_max(revenue, none)", "table_max(revenue, none)", False),  # later table step keyed with "|"
    ("greater(3, 2)", "greater(3, 2)", True),
    ("greater(2, 3)", "greater(3, 2)", False),
    ("garbage", "add(2, 3)", False),
    ("", "add(2, 3)", False),
])
def test_equivalent(pred, gold, expected):
    assert equivalent(pred, gold) is expected


def test_program_steps_normalises_numbers():
    assert program_steps("add(1,000, 5)") == [("add", "1000.0", "5.0")]
    assert program_steps("add(1, 2") is None                         # structure error
    assert program_steps("add(1000, 5%), divide(#0, 2)") == [
        ("add", "1000.0", "0.05"), ("divide", "#0", "2.0")]
    assert program_steps("nonsense") is None


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"FinQA sample not found at {SAMPLE}")
def test_every_sample_gold_program_executes_to_exe_ans():
    failures = []
    for split in ("train", "dev", "test"):
        for example in json.loads((SAMPLE / f"{split}.json").read_text()):
            qa = example["qa"]
            if not exec_correct(qa["program"], example["table"], qa["exe_ans"]):
                failures.append((example["id"], qa["program"], execute(qa["program"], example["table"]), qa["exe_ans"]))
            assert equivalent(qa["program"], qa["program"])
    assert failures == []
