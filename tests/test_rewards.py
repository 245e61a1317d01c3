"""Reward functions: one unit test per function, a fuzz test, the TRL wrappers and script 02."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.rewards import (RewardSpec, answer_matches, extract_numbers, extract_response, load_spec, step_overlap,
                           numeric_close, reward_log, score, spec_to_yaml, trl_reward_functions)

ROOT = Path(__file__).resolve().parents[1]
GOLD = {"id": "x-1", "table": [["", "2019"], ["revenue", "$ 1,000"]], "exe_ans": 0.34719,
        "target_program": "divide(114400, 329500)", "target_answer": "34.7%"}
RIGHT = '{"program": "divide(114400, 329500)", "answer": "34.7%"}'


def test_extract_response_strict_and_recovered():
    assert extract_response(RIGHT) == ({"program": "divide(114400, 329500)", "answer": "34.7%"}, True)
    assert extract_response("  " + RIGHT + "\n")[1] is True                      # whitespace is fine
    assert extract_response("```json\n" + RIGHT + "\n```")[1] is False          # fenced: recovered, not strict
    assert extract_response("answer: " + RIGHT)[0]["answer"] == "34.7%"         # surrounding text
    assert extract_response('{"program": "add(1, 2)"}') == ({"program": "add(1, 2)"}, False)  # no answer key
    assert extract_response("no json here") == (None, False)
    assert extract_response(None) == (None, False)


def test_extract_numbers():
    assert extract_numbers("$ 1,234.5 million") == [1234.5]
    assert extract_numbers("34.7%") == pytest.approx([0.347])
    assert extract_numbers("34.7 %") == pytest.approx([0.347])
    assert extract_numbers("-2.5") == [-2.5]
    assert extract_numbers("none") == []


def test_answer_matches():
    assert answer_matches("34.7%", "34.7%", 0.34719)        # FinQA's answer text
    assert answer_matches("34.719%", "34.7%", 0.34719)      # rounds to exe_ans at 5 decimals
    assert answer_matches("0.34719", "34.7%", 0.34719)
    assert not answer_matches("35%", "34.7%", 0.34719)
    assert answer_matches("Yes.", "yes", "yes")
    assert not answer_matches("no", "yes", "yes")
    assert not answer_matches("", "34.7%", 0.34719)


def test_numeric_close():
    assert numeric_close(0.35, 0.34719)                     # 0.8% off
    assert numeric_close(34.7, 0.34719)                     # percent vs fraction
    assert numeric_close(0.0035, 0.34719)                   # fraction of a percent figure
    assert not numeric_close(34.7, 0.34719, percent_scale_aware=False)
    assert not numeric_close(0.30, 0.34719)                 # 13.6% off
    assert numeric_close(0.33, 0.34719, rel_tol=0.05)       # 4.95% off
    assert not numeric_close("yes", "yes")                  # yes/no is never "close"
    assert not numeric_close(None, 1.0)


def test_program_match():
    def program_match(program, gold_program):  # score()'s partial credit of the program component
        completion = "no json" if program is None else json.dumps({"program": program, "answer": ""})
        return score(completion, {**GOLD, "target_program": gold_program}).program_match

    assert program_match("divide(114400, 329500)", "divide(114400, 329500)") == 1.0
    assert program_match("add(2, 3)", "add(3, 2)") == 1.0                            # equivalent
    assert program_match("subtract(5, 3), divide(#0, 2)", "subtract(5, 3), divide(#0, 3)") == 0.5
    assert step_overlap("add(2, 3)", "add(3, 2)") == 0.0                               # steps differ as text
    assert program_match("subtract(5, 3)", "subtract(5, 3), divide(#0, 3)") == 0.5  # over the longer
    assert program_match("garbage", "add(2, 3)") == 0.0
    assert program_match(None, "add(2, 3)") == 0.0
    assert program_match("add(2, 3)", None) == 0.0                                   # no gold program


def test_score_hand_computed():
    assert score(RIGHT, GOLD).total == pytest.approx(1.3)                         # 1.0 + 0.3
    assert score("```" + RIGHT + "```", GOLD).total == pytest.approx(1.1)         # 1.0 + 0.3 - 0.2
    assert score('{"program": "divide(114400, 330000)", "answer": "?"}', GOLD).total == pytest.approx(0.8)
    assert score("", GOLD).total == pytest.approx(-0.2)
    weighted = score(RIGHT, GOLD, RewardSpec(exact=2.0, program=0.0))
    assert (weighted.exact, weighted.program, weighted.total) == (2.0, 0.0, 2.0)


def test_score_accepts_exe_ans_stored_as_text():
    assert score(RIGHT, {**GOLD, "exe_ans": "0.34719"}).exact_match                # datasets may stringify


def test_spec_round_trip(tmp_path):
    spec = RewardSpec(numeric_rel_tol=0.02, format=-0.5)
    path = tmp_path / "reward_spec.yaml"
    path.write_text(spec_to_yaml(spec))
    assert load_spec(path) == spec
    path.write_text("weights: {exact: 1.0, numerc: 0.8}\n")
    with pytest.raises(ValueError, match="numerc"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="02_build_rewards"):
        load_spec(tmp_path / "missing.yaml")


def test_trl_wrappers_sum_to_total_and_keep_names():
    functions, weights = trl_reward_functions()
    assert [f.__name__ for f in functions] == ["exact", "numeric", "program", "format_error"]
    completions = [[{"role": "assistant", "content": RIGHT}], [{"role": "assistant", "content": "junk"}]]
    columns = {k: [v, v] for k, v in GOLD.items()}
    columns["id"] = ["a", "b"]
    per_function = [f(completions, **columns) for f in functions]
    totals = [sum(w * values[i] for w, values in zip(weights, per_function)) for i in range(2)]
    assert totals == pytest.approx([1.3, -0.2])
    assert per_function[3] == [0.0, 1.0]                                           # format: 1 = invalid


def test_reward_log_is_trl_s_record_of_a_batch():
    record = reward_log([score(RIGHT, GOLD, RewardSpec()), score("junk", GOLD, RewardSpec())])
    assert record["reward"] == pytest.approx((1.3 - 0.2) / 2)                       # weighted totals
    assert record["reward_std"] == pytest.approx(1.5 / math.sqrt(2))              # n - 1: |1.3 + 0.2| / sqrt 2
    assert record["rewards/format_error/mean"] == 0.5                             # unweighted: 1 of 2 invalid
    assert record["rewards/exact/mean"] == 0.5 and record["rewards/program/mean"] == 0.5
    assert record["rewards/exact/std"] == pytest.approx(math.sqrt(0.5))
    assert reward_log([])["reward"] == 0.0 and reward_log([])["reward_std"] == 0.0  # an empty batch: no error


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_scores_within_bounds(text):
    result = score(text, GOLD)
    assert -0.2 <= result.total <= 1.3


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r'\{"program": "[a-z_]{0,8}\((#?[0-9a-z_,.%$ -]{0,8}, ){0,3}[#0-9a-z_.%-]{0,8}\)(, [a-z_]{0,8}\([^)]{0,10}\)){0,3}", "answer": "[^"]{0,10}"\}', fullmatch=True))
def test_program_like_json_scores_within_bounds(text):
    result = score(text, GOLD)
    assert -0.2 <= result.total <= 1.3
    assert result.category in ("correct", "numeric_close", "wrong_value", "invalid_program", "format_error")


def test_build_rewards_script_writes_spec_and_passing_cases(tmp_path):
    run = subprocess.run([sys.executable, "02_build_rewards.py", "--output_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert load_spec(tmp_path / "reward_spec.yaml") == RewardSpec()
    cases = json.loads((tmp_path / "unit_tests" / "test_cases.json").read_text())
    results = json.loads((tmp_path / "unit_tests" / "test_results.json").read_text())
    assert len(cases) == len(results) >= 25
    assert all(r["passed"] for r in results)
    # the hand-computed totals under the seed weights agree with the scored ones
    for item, result in zip(cases, results):
        assert result["result"]["total"] == pytest.approx(item["expected_total_default"]), item["name"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["failed"] == 0


def test_build_rewards_script_fails_on_a_wrong_spec_value(tmp_path):
    run = subprocess.run([sys.executable, "02_build_rewards.py", "--output_dir", str(tmp_path),
                          "--set", "exact=oops"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "exact must be float" in run.stderr


def test_program_equivalence_is_not_step_overlap():
    # same steps in another order: every step is shared, but the final expression differs
    gold = {**GOLD, "target_program": "add(3, 4), add(1, 2)", "exe_ans": 3.0}
    result = score('{"program": "add(1, 2), add(3, 4)", "answer": "7"}', gold)
    assert result.program_match == 1.0 and not result.program_equivalent
