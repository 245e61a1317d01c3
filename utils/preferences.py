"""Preference pairs from scored candidates: which completion of a prompt is preferred to which.

Used by 08_build_prefs.py (building pairs.jsonl) and 09_train_dpo.py (the held-out split).
A candidate is one scored completion: a dict with at least `completion`, `total`, `exact_match`
and `format_valid` (one line of 04's scores.jsonl). Everything here is pure: no I/O, no globals,
and no randomness except through an explicit seed.

    ranked = build_pairs(candidates_of_one_prompt, min_margin=0.2)
    for chosen, rejected, margin in ranked: ...

The rule: prefer exact-match and valid JSON over non-match or invalid, so every pair pushes DPO toward
an answer the reward verifies as better. A pair
(chosen, rejected) is kept when
  1. chosen passes the JSON check (`format_valid`): DPO must never push up a malformed answer,
  2. chosen ranks strictly higher by `rank_key` (exact match, then valid format, then reward),
  3. reward(chosen) >= reward(rejected) + min_margin: smaller gaps are mostly noise.
"""
from __future__ import annotations

import random
from collections import Counter

# Rewards are sums of weights like 1.0 - 0.8 = 0.19999999999999996: a gap meant to equal
# min_margin must count as reaching it.
MARGIN_EPS = 1e-9


def rank_key(candidate: dict) -> tuple[bool, bool, float]:
    """Sort key of a candidate: exact match first, then valid JSON format, then total reward.

    Args:
        candidate: a scored candidate (`exact_match`, `format_valid`, `total`).
    Returns:
        (exact_match, format_valid, total); a larger tuple is a better candidate.
    Example:
        >>> rank_key({"exact_match": True, "format_valid": False, "total": 0.8})
        (True, False, 0.8)
        >>> rank_key({"exact_match": False, "format_valid": True, "total": 1.1}) < (True, False, 0.8)
        True
    """
    return bool(candidate["exact_match"]), bool(candidate["format_valid"]), float(candidate["total"])


def dedupe(candidates: list[dict]) -> list[dict]:
    """Candidates with distinct completion texts, first occurrence kept, order preserved.

    Example:
        >>> [c["candidate"] for c in dedupe([{"candidate": 0, "completion": "a"},
        ...                                  {"candidate": 1, "completion": "a"},
        ...                                  {"candidate": 2, "completion": "b"}])]
        [0, 2]
    """
    seen, kept = set(), []
    for candidate in candidates:
        if candidate["completion"] not in seen:
            seen.add(candidate["completion"])
            kept.append(candidate)
    return kept


def build_pairs(candidates: list[dict], min_margin: float,
                max_pairs_per_prompt: int | None = None) -> list[tuple[dict, dict, float]]:
    """Every (chosen, rejected) pair of one prompt's candidates allowed by the rule above.

    Args:
        candidates: the scored candidates of one prompt, in candidate order. Identical completion
            texts are merged first (the first one is kept), so no pair compares a text to itself.
        min_margin: the smallest reward gap total(chosen) - total(rejected) kept (>= 0).
        max_pairs_per_prompt: keep at most this many pairs (the largest margins); None = all.
    Returns:
        [(chosen, rejected, margin)], largest margin first; ties keep candidate order (chosen's
        position, then rejected's), so the result is deterministic.
    Example:
        >>> good = {"completion": "g", "total": 1.3, "exact_match": True, "format_valid": True}
        >>> close = {"completion": "c", "total": 1.1, "exact_match": False, "format_valid": True}
        >>> bad = {"completion": "b", "total": -0.2, "exact_match": False, "format_valid": False}
        >>> [(c["completion"], r["completion"], round(m, 2)) for c, r, m in
        ...  build_pairs([good, close, bad], min_margin=0.2)]
        [('g', 'b', 1.5), ('c', 'b', 1.3), ('g', 'c', 0.2)]
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin} (--min_margin or algorithm.min_margin)")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    unique = dedupe(candidates)
    found = []
    for i, chosen in enumerate(unique):
        if not chosen["format_valid"]:
            continue
        for j, rejected in enumerate(unique):
            margin = float(chosen["total"]) - float(rejected["total"])
            if rank_key(chosen) > rank_key(rejected) and margin >= min_margin - MARGIN_EPS:
                found.append((-margin, i, j, chosen, rejected, margin))
    found.sort(key=lambda item: item[:3])
    pairs = [(chosen, rejected, margin) for *_, chosen, rejected, margin in found]
    return pairs[:max_pairs_per_prompt] if max_pairs_per_prompt is not None else pairs


def split_by_prompt(pairs: list[dict], holdout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split pairs into (train, holdout) by prompt id, so no held-out prompt is trained on.

    Args:
        pairs: rows of pairs.jsonl (need `id`).
        holdout_fraction: share of prompt ids held out, in [0, 1); at least one prompt is held out
            when the fraction is > 0 and there are two or more prompts.
        seed: shuffles the sorted prompt ids; the same seed gives the same split.
    Returns:
        (train_pairs, holdout_pairs), each in the input order.
    Example:
        >>> rows = [{"id": "a"}, {"id": "a"}, {"id": "b"}]
        >>> train, held = split_by_prompt(rows, 0.5, seed=0)
        >>> sorted({r["id"] for r in train} | {r["id"] for r in held}), len(train) + len(held)
        (['a', 'b'], 3)
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction} "
                         f"(algorithm.holdout_fraction)")
    ids = sorted({str(pair["id"]) for pair in pairs})
    random.Random(seed).shuffle(ids)
    n_held = round(holdout_fraction * len(ids))
    if holdout_fraction > 0 and len(ids) >= 2:
        n_held = min(max(n_held, 1), len(ids) - 1)  # keep at least one prompt for training
    held = set(ids[:n_held])
    return ([pair for pair in pairs if str(pair["id"]) not in held],
            [pair for pair in pairs if str(pair["id"]) in held])


def histogram_text(values: list[float], bin_width: float = 0.2, bar_width: int = 40) -> str:
    """A text histogram, one line per bin: `[low, high)  count  ####`.

    Example:
        >>> print(histogram_text([0.2, 0.3, 1.5], bin_width=0.5, bar_width=4))
        [0.00, 0.50)      2  ####
        [0.50, 1.00)      0
        [1.00, 1.50)      0
        [1.50, 2.00)      1  ##
    """
    if not values:
        return "(no values)"
    # bins by integer index: floor(v / width) with a nudge, so 0.6/0.2 lands in bin 3, not 2
    index = [int((value + MARGIN_EPS) // bin_width) for value in values]
    counts = Counter(index)
    top = max(counts.values())
    lines = []
    for b in range(min(index), max(index) + 1):
        bar = "#" * round(bar_width * counts[b] / top)
        lines.append(f"[{b * bin_width:.2f}, {(b + 1) * bin_width:.2f})  {counts[b]:5d}  {bar}".rstrip())
    return "\n".join(lines)


def preference_accuracy(policy_chosen: list[float], policy_rejected: list[float], ref_chosen: list[float],
                        ref_rejected: list[float], beta: float) -> dict:
    """How often a policy prefers chosen to rejected, from summed completion log-probs.

    Args:
        policy_chosen, policy_rejected: log pi(y|x) of each pair's chosen / rejected completion.
        ref_chosen, ref_rejected: the same under the reference policy.
        beta: DPO's beta (scales the implicit reward).
    Returns:
        n_pairs;
        logp_accuracy: fraction with log pi(chosen) > log pi(rejected), the policy's own ranking
            (meaningful for any policy, the SFT start included);
        reward_accuracy: fraction with implicit reward r = beta * (log pi - log ref) higher for
            chosen, i.e. TRL's rewards/accuracies (0 at the start of DPO, where pi = ref and every
            margin is 0);
        reward_margin: mean r(chosen) - r(rejected).
    Example:
        >>> preference_accuracy([-5.0, -9.0], [-7.0, -8.0], [-6.0, -9.0], [-6.0, -8.0], beta=0.1)
        {'n_pairs': 2, 'logp_accuracy': 0.5, 'reward_accuracy': 0.5, 'reward_margin': 0.1}
    """
    columns = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if len({len(column) for column in columns}) != 1:
        raise ValueError("preference_accuracy: the four log-prob lists must have the same length")
    n = len(policy_chosen)
    if n == 0:
        return {"n_pairs": 0, "logp_accuracy": None, "reward_accuracy": None, "reward_margin": None}
    margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(*columns)]
    return {"n_pairs": n,
            "logp_accuracy": sum(pc > pr for pc, pr in zip(policy_chosen, policy_rejected)) / n,
            "reward_accuracy": sum(margin > 0 for margin in margins) / n,
            "reward_margin": round(sum(margins) / n, 12)}
