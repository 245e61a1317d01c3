"""Preference pairs: utils/preferences.py on hand-made candidates, and 08_build_prefs.py as a
subprocess on hand-written candidates.jsonl / scores.jsonl. Rewards use the default weights:
exact +1.0, numeric +0.8, program +0.3 x match, format -0.2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.preferences import (build_pairs, dedupe, histogram_text, preference_accuracy, rank_key,
                               split_by_prompt)
from utils.runs import atomic_write_jsonl, sha256_file

REPO = Path(__file__).resolve().parents[1]


def cand(index, text, total, exact, valid):
    return {"candidate": index, "completion": text, "total": total, "exact_match": exact, "format_valid": valid}


EXACT = cand(0, "exact", 1.3, True, True)             # right value, gold program, valid JSON
CLOSE = cand(1, "close", 1.1, False, True)            # numeric +0.8, full program +0.3
WRONG = cand(2, "wrong", 0.15, False, True)           # wrong value, half the program steps
BROKEN = cand(3, "broken", -0.2, False, False)        # not JSON: format penalty only
LUCKY = cand(4, "lucky", 1.1, True, False)            # right value in a fenced, invalid response


def texts(pairs):
    return [(chosen["completion"], rejected["completion"], round(margin, 6)) for chosen, rejected, margin in pairs]


# --- rank key ---

def test_rank_key_orders_exact_then_format_then_reward():
    ordered = sorted([BROKEN, WRONG, LUCKY, CLOSE, EXACT], key=rank_key, reverse=True)
    assert [c["completion"] for c in ordered] == ["exact", "lucky", "close", "wrong", "broken"]


# --- build_pairs ---

def test_all_pairs_hand_computed():
    pairs = build_pairs([EXACT, CLOSE, WRONG, BROKEN, LUCKY], min_margin=0.2)
    assert texts(pairs) == [
        ("exact", "broken", 1.5),   # 1.3 - (-0.2)
        ("close", "broken", 1.3),   # 1.1 - (-0.2)
        ("exact", "wrong", 1.15),   # 1.3 - 0.15
        ("close", "wrong", 0.95),   # 1.1 - 0.15
        ("wrong", "broken", 0.35),  # 0.15 - (-0.2)
        ("exact", "close", 0.2),    # 1.3 - 1.1 = 0.19999999999999996 in floats: counts as 0.2
        ("exact", "lucky", 0.2),    # both match, only exact is valid JSON; lucky is never chosen
    ]


def test_exact_invalid_is_rejected_only_by_an_exact_valid_one():
    assert texts(build_pairs([EXACT, LUCKY], min_margin=0.2)) == [("exact", "lucky", 0.2)]
    assert build_pairs([CLOSE, LUCKY], min_margin=0.0) == []   # close ranks lower; lucky fails the JSON check


def test_exact_match_beats_non_match_never_the_reverse():
    higher_reward_miss = cand(1, "miss", 1.5, False, True)      # only possible with other weights
    assert build_pairs([EXACT, higher_reward_miss], min_margin=0.0) == []   # rank and reward disagree: no pair
    assert texts(build_pairs([CLOSE, EXACT], min_margin=0.0)) == [("exact", "close", 0.2)]


def test_min_margin_respected():
    assert texts(build_pairs([EXACT, CLOSE, WRONG], min_margin=0.5)) == [("exact", "wrong", 1.15),
                                                                      ("close", "wrong", 0.95)]
    assert build_pairs([EXACT, CLOSE, WRONG], min_margin=2.0) == []
    assert build_pairs([cand(0, "a", 0.3, False, True), cand(1, "b", 0.11, False, True)], 0.2) == []  # gap 0.19


def test_equal_candidates_give_no_pair():
    assert build_pairs([cand(0, "a", 0.3, False, True), cand(1, "b", 0.3, False, True)], min_margin=0.0) == []


def test_identical_texts_are_merged():
    twin = cand(5, "exact", 1.3, True, True)
    assert [c["candidate"] for c in dedupe([EXACT, twin, WRONG])] == [0, 2]
    assert texts(build_pairs([EXACT, twin, WRONG], min_margin=0.2)) == [("exact", "wrong", 1.15)]


def test_max_pairs_per_prompt_keeps_largest_margins():
    pairs = build_pairs([EXACT, CLOSE, WRONG, BROKEN], min_margin=0.2, max_pairs_per_prompt=2)
    assert texts(pairs) == [("exact", "broken", 1.5), ("close", "broken", 1.3)]


def test_ties_keep_candidate_order():
    a, b = cand(0, "a", 0.3, False, True), cand(1, "b", 0.3, False, True)
    assert texts(build_pairs([b, a, BROKEN], 0.2)) == [("b", "broken", 0.5), ("a", "broken", 0.5)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs([EXACT], min_margin=-0.1)
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        build_pairs([EXACT], min_margin=0.2, max_pairs_per_prompt=0)


candidate_lists = st.lists(
    st.builds(lambda text, total, exact, valid: {"completion": text, "total": total, "exact_match": exact,
                                                 "format_valid": valid},
              st.sampled_from("abcdef"), st.sampled_from([-0.2, 0.0, 0.15, 0.3, 0.8, 1.0, 1.1, 1.3]),
              st.booleans(), st.booleans()),
    max_size=8)


@settings(max_examples=200, deadline=None)
@given(candidates=candidate_lists, min_margin=st.sampled_from([0.0, 0.1, 0.2, 0.5]))
def test_pair_invariants(candidates, min_margin):
    pairs = build_pairs(candidates, min_margin)
    for chosen, rejected, margin in pairs:
        assert chosen["format_valid"]                                   # chosen passes the JSON check
        assert chosen["total"] >= rejected["total"] + min_margin - 1e-9  # and out-scores rejected
        assert margin == pytest.approx(chosen["total"] - rejected["total"])
        assert rank_key(chosen) > rank_key(rejected)
        assert chosen["completion"] != rejected["completion"]
        assert rejected["exact_match"] <= chosen["exact_match"]         # a match never loses to a miss
    assert len({(c["completion"], r["completion"]) for c, r, _ in pairs}) == len(pairs)
    assert build_pairs(list(candidates), min_margin) == pairs           # deterministic


# --- split and histogram ---

def test_split_by_prompt():
    rows = [{"id": f"p{i}", "n": j} for i in range(20) for j in range(i % 3 + 1)]
    train, held = split_by_prompt(rows, 0.1, seed=1)
    assert len({r["id"] for r in held}) == 2                          # 10% of 20 prompts
    assert not {r["id"] for r in train} & {r["id"] for r in held}     # no prompt on both sides
    assert len(train) + len(held) == len(rows)
    assert split_by_prompt(rows, 0.1, seed=1) == (train, held)        # seeded
    assert split_by_prompt(rows[:3], 0.1, seed=0)[1]                  # at least one prompt held out
    assert split_by_prompt(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_by_prompt(rows, 1.0, seed=0)


def test_histogram_text():
    assert histogram_text([]) == "(no values)"
    assert histogram_text([0.2, 0.2, 0.6], bin_width=0.2, bar_width=2).splitlines() == [
        "[0.20, 0.40)      2  ##",
        "[0.40, 0.60)      0",
        "[0.60, 0.80)      1  #",
    ]


def test_preference_accuracy():
    # pair 1: the policy moved toward chosen (+1) and away from rejected (-1): margin 0.1 * 2
    # pair 2: policy = reference: margin 0, not counted as preferred; its own log-probs favour rejected
    metrics = preference_accuracy([-5.0, -9.0], [-7.0, -8.0], [-6.0, -9.0], [-6.0, -8.0], beta=0.1)
    assert metrics == {"n_pairs": 2, "logp_accuracy": 0.5, "reward_accuracy": 0.5, "reward_margin": 0.1}
    at_start = preference_accuracy([-5.0], [-7.0], [-5.0], [-7.0], beta=0.1)   # pi = ref: all margins 0
    assert (at_start["logp_accuracy"], at_start["reward_accuracy"]) == (1.0, 0.0)
    assert preference_accuracy([], [], [], [], beta=0.1)["reward_accuracy"] is None
    with pytest.raises(ValueError, match="same length"):
        preference_accuracy([1.0], [], [], [], beta=0.1)


# --- 08_build_prefs.py ---

PROMPTS = {  # id -> candidates (text, total, exact_match, format_valid)
    "p1": [("A", 1.3, True, True), ("B", 0.15, False, True), ("C", -0.2, False, False), ("A", 1.3, True, True)],
    "p2": [("X", -0.2, False, False), ("Y", -0.2, False, False)],
    "p3": [("N", 1.1, False, True), ("E", 1.3, True, True), ("F", 1.0, False, True)],
}
# min_margin 0.2: p1: A>B 1.15, A>C 1.5, B>C 0.35 (the second A is a duplicate) -> 3 pairs
#                 p2: nothing valid -> 0;  p3: E>N 0.2, E>F 0.3 (N>F is 0.1) -> 2 pairs


@pytest.fixture
def candidates_dir(tmp_path):
    folder = tmp_path / "04_candidates"
    prompt_rows, score_rows = [], []
    for id_, cands in PROMPTS.items():
        prompt = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": f"question {id_}"}]
        prompt_rows.append({"id": id_, "prompt": prompt, "completions": [c[0] for c in cands],
                            "num_tokens": [3] * len(cands)})
        score_rows += [{"id": id_, "candidate": k, "completion": text, "total": total, "exact": 1.0 * exact,
                        "numeric": 0.0, "program": 0.0, "format": 0.0 if valid else -0.2, "format_valid": valid,
                        "exact_match": exact, "category": "correct" if exact else "wrong_value"}
                       for k, (text, total, exact, valid) in enumerate(cands)]
    atomic_write_jsonl(folder / "candidates.jsonl", prompt_rows)
    atomic_write_jsonl(folder / "scores.jsonl", score_rows)
    return folder


def run08(tmp_path, *args):
    command = [sys.executable, "08_build_prefs.py", *map(str, args), "--run_id", "pytest",
               "--paths.output_root", str(tmp_path / "outputs")]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_script_builds_pairs(tmp_path, candidates_dir):
    done = run08(tmp_path, "--candidates_dir", candidates_dir)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs" / "pytest" / "08_preferences"
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for p in pairs] == [
        ("p1", "A", "C", 1.5), ("p1", "A", "B", 1.15), ("p1", "B", "C", 0.35), ("p3", "E", "F", 0.3),
        ("p3", "E", "N", 0.2)]
    first = pairs[0]
    assert first["prompt"][1] == {"role": "user", "content": "question p1"}
    assert first["chosen"] == [{"role": "assistant", "content": "A"}]          # TRL conversational format
    assert (first["reward_chosen"], first["reward_rejected"]) == (1.3, -0.2)
    assert (first["chosen_candidate"], first["rejected_candidate"]) == (0, 2)

    stats = (out / "stats.txt").read_text()
    assert "pairs: 5 from 3 prompts" in stats
    assert "prompts with no pair: 1 (e.g. p2)" in stats
    assert "no candidate passes the JSON check: 1; valid candidates, but no gap >= min_margin" in stats
    assert "WARNING: only 5 pairs, fewer than the 10,000" in stats
    assert "margin histogram" in stats

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["inputs"]["scores"]["sha256"] == sha256_file(candidates_dir / "scores.jsonl")
    assert manifest["inputs"]["candidates"]["sha256"] == sha256_file(candidates_dir / "candidates.jsonl")
    assert manifest["config"]["algorithm"]["min_margin"] == 0.2                # from configs/algorithms/dpo.yaml
    assert manifest["metrics"]["n_pairs"] == 5
    assert manifest["metrics"]["n_prompts_without_pairs"] == 1
    assert manifest["metrics"]["n_prompts_without_valid_candidate"] == 1
    assert manifest["metrics"]["chosen_exact_match_rate"] == pytest.approx(4 / 5)


def test_script_options(tmp_path, candidates_dir):
    done = run08(tmp_path, "--candidates_dir", candidates_dir, "--max_pairs_per_prompt", 1, "--min_margin", 0.3)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs" / "pytest" / "08_preferences"
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["margin"]) for p in pairs] == [("p1", 1.5), ("p3", 0.3)]
    assert json.loads((out / "manifest.json").read_text())["config"]["algorithm"]["min_margin"] == 0.3


def test_script_no_pairs(tmp_path, candidates_dir):
    done = run08(tmp_path, "--candidates_dir", candidates_dir, "--min_margin", 2.0)   # largest gap is 1.5
    assert done.returncode == 0, done.stderr
    stats = (tmp_path / "outputs" / "pytest" / "08_preferences" / "stats.txt").read_text()
    assert "pairs: 0 from 3 prompts" in stats and "WARNING: no pairs: 09_train_dpo.py has nothing" in stats
    assert "valid candidates, but no gap >= min_margin (or all tied in rank): 2" in stats   # p1, p3


def test_script_missing_inputs(tmp_path):
    done = run08(tmp_path)
    assert done.returncode == 2
    assert "04_candidates/candidates.jsonl not found" in done.stderr
    assert "python 04_generate_candidates.py" in done.stderr


def test_script_mismatched_files(tmp_path, candidates_dir):
    scores = candidates_dir / "scores.jsonl"
    scores.write_text(scores.read_text().replace('"completion": "B"', '"completion": "Z"'))
    done = run08(tmp_path, "--candidates_dir", candidates_dir)
    assert done.returncode == 2
    assert "different runs" in done.stderr and "line 2" in done.stderr
