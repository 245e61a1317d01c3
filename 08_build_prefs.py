"""Build DPO preference pairs from the scored candidates of 04.

    python 08_build_prefs.py                                   # outputs/run_001/04_candidates
    python 08_build_prefs.py --min_margin 0.5 --max_pairs_per_prompt 4
    python 08_build_prefs.py --candidates_dir outputs/run_002/04_candidates --run_id run_002

Reads candidates.jsonl (prompts) and scores.jsonl (one scored candidate per line) and keeps, per
prompt, every pair (chosen, rejected) where chosen is valid JSON, ranks strictly higher (exact
match, then valid format, then reward: utils/preferences.py) and out-scores rejected by at least
--min_margin (default: algorithm.min_margin in configs/algorithms/dpo.yaml). Writes
outputs/<run_id>/08_preferences/: pairs.jsonl in TRL's conversational preference format (id,
prompt, chosen, rejected, reward_chosen, reward_rejected, margin, plus the candidate indexes),
stats.txt (counts, pairs per prompt, margin histogram, a warning under 10,000 pairs) and
manifest.json. Pair selection is deterministic; --seed is recorded only.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from utils import config as config_lib
from utils import cli, runs
from utils.preferences import build_pairs, histogram_text
from utils.data import is_finite_number, is_id

MODULE = "08_preferences"
RECOMMENDED_PAIRS = 10_000  # fewer pairs give a noisy DPO signal: stats.txt warns below this
RERUN = "rerun `python 04_generate_candidates.py`"


# What 08 reads of each line of 04's files, with the type it must hold: (check, description)
CANDIDATE_FIELDS = {
    "id": (is_id, "a string"),
    "prompt": (lambda v: isinstance(v, (list, str)), "a list of messages or a text"),
    "completions": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of texts"),
}
SCORE_FIELDS = {
    "id": (is_id, "a string"),
    "candidate": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a candidate index"),
    "completion": (lambda v: isinstance(v, str), "a text"),
    "total": (is_finite_number, "a finite number"),
    "exact_match": (lambda v: isinstance(v, bool), "true or false"),
    "format_valid": (lambda v: isinstance(v, bool), "true or false"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser, algo="dpo")
    parser.add_argument("--candidates_dir", default=None,
                        help="folder with candidates.jsonl and scores.jsonl "
                             "(default: outputs/<run_id>/04_candidates)")
    parser.add_argument("--min_margin", type=float, default=None,
                        help="smallest reward gap chosen - rejected (default: algorithm.min_margin)")
    parser.add_argument("--max_pairs_per_prompt", type=int, default=None,
                        help="keep at most this many pairs per prompt, largest margins first (default: all)")
    return parser.parse_known_args(argv)


# --- helpers ---

def read_rows(path: Path, fields: dict, what: str) -> list[tuple[int, dict]]:
    """(line, record) of one of 04's files (utils.runs.read_records), which must not be empty."""
    numbered = runs.read_records(path, fields, "04_generate_candidates.py")
    if not numbered:
        raise cli.UsageError(f"{path} holds no {what}: {RERUN}")
    return numbered


def load_candidates(folder: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(prompt rows of candidates.jsonl, {prompt id: its scored candidates in candidate order}); every
    candidate must have exactly one score."""
    paths = {name: folder / f"{name}.jsonl" for name in ("candidates", "scores")}
    for path in paths.values():
        if not path.is_file():
            raise cli.UsageError(f"{path} not found: run `python 04_generate_candidates.py` first "
                                  f"(or pass --candidates_dir FOLDER holding candidates.jsonl and scores.jsonl)")
    prompts = [row for _, row in read_rows(paths["candidates"], CANDIDATE_FIELDS, "prompts")]
    completions = {row["id"]: row["completions"] for row in prompts}
    scored, seen = defaultdict(list), set()
    for line, row in read_rows(paths["scores"], SCORE_FIELDS, "scored candidates"):
        texts = completions.get(row["id"])
        if texts is None or not row["candidate"] < len(texts) or texts[row["candidate"]] != row["completion"]:
            raise cli.UsageError(f"{paths['scores']}: line {line} (id {row['id']!r}, candidate {row['candidate']}) "
                                  f"does not match {paths['candidates']}: the files come from different runs; {RERUN}")
        if (row["id"], row["candidate"]) in seen:
            raise cli.UsageError(f"{paths['scores']}: line {line}: candidate {row['candidate']} of id {row['id']!r} "
                                 f"is scored twice; {RERUN}")
        seen.add((row["id"], row["candidate"]))
        scored[row["id"]].append(row)
    if unscored := [(id_, k) for id_, texts in completions.items() for k in range(len(texts)) if (id_, k) not in seen]:
        raise cli.UsageError(f"{paths['scores']}: no score for {len(unscored)} candidates (e.g. id {unscored[0][0]!r} "
                             f"candidate {unscored[0][1]}): the file is cut short or from another run; {RERUN}")
    for rows in scored.values():
        rows.sort(key=lambda row: row["candidate"])
    return prompts, scored


def pair_rows(prompts: list[dict], scored: dict, min_margin: float, max_pairs: int | None) -> list[dict]:
    """pairs.jsonl rows: chosen/rejected as assistant message lists, so DPOTrainer reads them as is."""
    rows = []
    for prompt in prompts:
        for chosen, rejected, margin in build_pairs(scored.get(prompt["id"], []), min_margin, max_pairs):
            rows.append({
                "id": prompt["id"], "prompt": prompt["prompt"],
                "chosen": [{"role": "assistant", "content": chosen["completion"]}],
                "rejected": [{"role": "assistant", "content": rejected["completion"]}],
                "reward_chosen": chosen["total"], "reward_rejected": rejected["total"],
                "margin": round(margin, 6),
                "chosen_candidate": chosen["candidate"], "rejected_candidate": rejected["candidate"]})
    return rows


def summarize(prompts: list[dict], scored: dict, rows: list[dict], min_margin: float) -> tuple[dict, str]:
    """(metrics for the manifest, stats.txt)."""
    per_prompt = Counter(row["id"] for row in rows)
    counts = [per_prompt[prompt["id"]] for prompt in prompts]
    without = [prompt["id"] for prompt in prompts if not per_prompt[prompt["id"]]]
    no_valid = sum(not any(c["format_valid"] for c in scored.get(id_, [])) for id_ in without)
    candidates = [c for prompt in prompts for c in scored.get(prompt["id"], [])]
    margins = [row["margin"] for row in rows]
    by_key = {(c["id"], c["candidate"]): c for c in candidates}
    metrics = {
        "n_pairs": len(rows), "n_prompts": len(prompts), "n_prompts_with_pairs": len(prompts) - len(without),
        "n_prompts_without_pairs": len(without), "n_prompts_without_valid_candidate": no_valid,
        "n_candidates": len(candidates),
        "n_distinct_candidates": sum(len({c["completion"] for c in scored.get(p["id"], [])}) for p in prompts),
        "pairs_per_prompt_mean": statistics.fmean(counts) if counts else 0.0,
        "margin_mean": statistics.fmean(margins) if margins else 0.0,
        "chosen_exact_match_rate": (statistics.fmean(by_key[row["id"], row["chosen_candidate"]]["exact_match"]
                                                     for row in rows) if rows else 0.0),
        "min_margin": min_margin,
    }
    distribution = Counter(counts)
    lines = [
        f"pairs: {len(rows)} from {len(prompts)} prompts ({metrics['n_candidates']} candidates, "
        f"{metrics['n_distinct_candidates']} distinct), min_margin {min_margin}",
        f"prompts with at least one pair: {metrics['n_prompts_with_pairs']}",
        f"prompts with no pair: {len(without)}" + (f" (e.g. {', '.join(map(str, without[:5]))})" if without else ""),
        f"  no candidate passes the JSON check: {no_valid}; valid candidates, but no gap >= min_margin "
        f"(or all tied in rank): {len(without) - no_valid}",
        f"chosen that match exactly: {metrics['chosen_exact_match_rate']:.1%}",
        "",
        "pairs per prompt (pairs: prompts):",
        *(f"  {n}: {distribution[n]}" for n in sorted(distribution)),
        f"  mean {metrics['pairs_per_prompt_mean']:.2f}, max {max(counts, default=0)}",
        "",
        "margin histogram (reward_chosen - reward_rejected):",
        histogram_text(margins),
    ]
    if not rows:
        lines += ["", "WARNING: no pairs: 09_train_dpo.py has nothing to train on. Train SFT longer (so candidates "
                      "are valid JSON), sample more candidates per prompt (04 --num_candidates) or lower "
                      "--min_margin."]
    elif len(rows) < RECOMMENDED_PAIRS:
        lines += ["", f"WARNING: only {len(rows)} pairs, fewer than the {RECOMMENDED_PAIRS:,} the seed asks for. "
                      f"DPO on so few pairs is noisy: sample more candidates per prompt "
                      f"(04 --num_candidates), use more prompts, or lower --min_margin."]
    return metrics, "\n".join(lines) + "\n"


# --- main ---

def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens)
    if args.min_margin is not None:  # the value used goes into the manifest's config
        cfg["algorithm"]["min_margin"] = args.min_margin
    min_margin = cfg["algorithm"]["min_margin"]
    root = Path(cfg["paths"]["output_root"])
    candidates_dir = Path(args.candidates_dir) if args.candidates_dir else root / args.run_id / "04_candidates"
    folder = runs.module_dir(args.run_id, MODULE, cfg["paths"]["output_dir"], root)
    with runs.Manifest(folder, MODULE, vars(args), cfg, cfg["training"]["seed"]) as manifest:
        # --- data ---
        prompts, scored = load_candidates(candidates_dir)
        manifest.add_input("candidates", candidates_dir / "candidates.jsonl")
        manifest.add_input("scores", candidates_dir / "scores.jsonl")

        # --- pairs ---
        rows = pair_rows(prompts, scored, min_margin, args.max_pairs_per_prompt)
        metrics, stats = summarize(prompts, scored, rows, min_margin)
        manifest.add_output("pairs", runs.atomic_write_jsonl(folder / "pairs.jsonl", rows))
        manifest.add_output("stats", runs.atomic_write_text(folder / "stats.txt", stats))
        manifest.metrics.update(metrics)
    print(stats, end="")
    print(f"-> {folder / 'pairs.jsonl'}")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
