"""utils/metrics.py: aggregate() on hand-scored completions, bootstrap CIs, failure counts."""
import math

import pytest

from utils.metrics import CATEGORIES, aggregate, bootstrap_ci, failure_counts
from utils.rewards import RewardSpec, score

# Gold: (1200 - 1000) / 1000 = 0.2, answer "20%"
EXAMPLE = {"table": [], "exe_ans": 0.2, "target_program": "subtract(1200, 1000), divide(#0, 1000)",
           "target_answer": "20%"}
COMPLETIONS = [
    '{"program": "subtract(1200, 1000), divide(#0, 1000)", "answer": "20%"}',  # correct: 1.0 + 0.3 = 1.3
    '{"program": "subtract(1200, 1000), divide(#0, 1010)", "answer": "19.8%"}',  # 0.19802 is close: 0.8 + 0.3 * 0.5
    "lorem ipsum",                                                              # garbage: -0.2
    '```json\n{"program": "subtract(1200, 400)", "answer": "800"}\n```',        # wrong value, fenced: -0.2
    '{"program": "", "answer": "20%"}',                                         # answer only: 1.0 - 0.2 = 0.8
]


@pytest.fixture(scope="module")
def results():
    return [score(text, EXAMPLE, RewardSpec()) for text in COMPLETIONS]


def test_aggregate_hand_computed(results):
    metrics = aggregate(results, n_resamples=0)
    expected = {
        "exec_acc": 1 / 5,            # only the correct program executes to 0.2
        "prog_acc": 1 / 5,            # only the correct program is equivalent
        "answer_acc": 2 / 5,          # "20%" twice
        "numeric_acc": 3 / 5,         # correct, close, answer only (exact counts as within tolerance)
        "format_rate": 2 / 5,         # correct and close are the bare JSON with a parseable program
        "valid_program_rate": 3 / 5,  # correct, close, wrong execute
        "reward_mean": (1.3 + 0.95 - 0.2 - 0.2 + 0.8) / 5,
        "reward_exact_mean": 2 / 5,
        "reward_numeric_mean": 0.8 / 5,
        "reward_program_mean": (0.3 + 0.15) / 5,
        "reward_format_mean": -0.2 * 3 / 5,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert metrics["n_examples"] == 5
    assert metrics["tokens_generated"] is None and metrics["tokens_per_s"] is None
    assert not [key for key in metrics if key.endswith("_ci95")]  # n_resamples=0: no CIs


def test_aggregate_four_completions(results):
    metrics = aggregate(results[:4], n_resamples=0)  # correct, close, garbage, wrong
    assert (metrics["exec_acc"], metrics["numeric_acc"], metrics["format_rate"]) == (0.25, 0.5, 0.5)


def test_tokens_per_s(results):
    metrics = aggregate(results, tokens_generated=200, wall_time_s=4.0, n_resamples=0)
    assert (metrics["tokens_generated"], metrics["wall_time_s"], metrics["tokens_per_s"]) == (200, 4.0, 50.0)
    assert aggregate(results, tokens_generated=200, wall_time_s=0.0, n_resamples=0)["tokens_per_s"] is None


def test_confidence_intervals(results):
    metrics = aggregate(results, seed=3, n_resamples=500)
    for name in ("exec_acc", "prog_acc", "answer_acc", "numeric_acc", "format_rate", "valid_program_rate"):
        low, high = metrics[f"{name}_ci95"]
        assert 0.0 <= low <= metrics[name] <= high <= 1.0, name
    assert metrics["exec_acc_ci95"][1] > metrics["exec_acc_ci95"][0]  # 1 of 5 is far from certain
    assert aggregate(results, seed=3, n_resamples=500) == metrics  # same seed, same CIs
    assert aggregate(results, seed=4, n_resamples=500)["exec_acc"] == metrics["exec_acc"]


def test_bootstrap_ci():
    assert bootstrap_ci([1, 1, 1], seed=0) == [1.0, 1.0]        # no spread, no width
    assert bootstrap_ci([], seed=0) == [0.0, 0.0]                # nothing to resample
    low, high = bootstrap_ci([0, 1] * 50, seed=0, n_resamples=2000)
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62             # about 0.5 -+ 1.96 * 0.05
    assert bootstrap_ci([0, 1, 1], seed=7) == bootstrap_ci([0, 1, 1], seed=7)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1, 0], n_resamples=0)


def test_empty():
    metrics = aggregate([])
    assert metrics["n_examples"] == 0
    assert metrics["exec_acc"] == metrics["reward_mean"] == metrics["format_rate"] == 0.0
    assert metrics["exec_acc_ci95"] == [0.0, 0.0]
    assert failure_counts([]) == dict.fromkeys(CATEGORIES, 0)


def test_failure_counts(results):
    assert failure_counts(results) == {"correct": 2, "numeric_close": 1, "wrong_value": 1,
                                       "invalid_program": 0, "format_error": 1}


def test_all_values_are_plain_json_numbers(results):
    metrics = aggregate(results, tokens_generated=10, wall_time_s=1.5, seed=0, n_resamples=50)
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        assert all(type(v) in (int, float) and math.isfinite(v) for v in values), key
