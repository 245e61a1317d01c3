"""Check the raw FinQA files before anything trains on them.

    python 00_check_data.py                                   # datasets/finqa/{train,dev,test}.json
    python 00_check_data.py --data_root ../shared/data/finqa-sample --no_tokenizer --strict

Per split: the file is there and is valid JSON, every example has the official schema, ids are
unique, table shapes, and every gold program executes to its `exe_ans` under the official
FinQA rules (utils/finqa_program.py). Statistics: question and context lengths in words and in
tokens of the configured model's tokenizer, op distribution, program steps. Writes
outputs/<run_id>/00_data_validation/{summary.json, samples.json, manifest.json}.
Exit status: 2 when a file is missing or corrupt (one error line naming it), 1 with --strict
when a gold program does not execute to its exe_ans; otherwise 0 (schema problems, a NaN
exe_ans among them, and mismatches are reported in summary.json).
"""
from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from utils import config as config_lib
from utils import cli, runs
from utils.data import NOTE_PREFIX, DataError, build_context, build_prompt, count_prompt_tokens, \
    load_finqa_split, validate_example
from utils.finqa_program import OPS, execute, tokenize

MODULE = "00_data_validation"
SPLITS = ("train", "dev", "test")
MAX_LISTED = 10  # problems printed per kind and split; summary.json keeps all of them


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    parser.add_argument("--data_root", default="datasets/finqa",
                        help="folder with the official {train,dev,test}.json (default: %(default)s)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                        help="splits to check (default: all)")
    parser.add_argument("--num_samples", type=int, default=3, help="examples per split in samples.json")
    parser.add_argument("--no_tokenizer", action="store_true",
                        help="skip token counts (no model tokenizer needed)")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero when a gold program does not execute to its exe_ans")
    return parser.parse_known_args(argv)


# --- helpers ---

def describe(values) -> dict:
    """mean / median / p95 / max of a list of numbers (None-safe for empty lists)."""
    if not values:
        return {"mean": None, "median": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(ordered), 1), "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def load_tokenizer_or_none(cfg, disabled: bool):
    if disabled:
        return None
    try:
        from utils.modeling import load_tokenizer
        return load_tokenizer(cfg)
    except Exception as error:  # token counts are optional: keep checking the data without them
        print(f"warning: tokenizer of {cfg['model']['name_or_path']} not loaded ({error}); "
              "token statistics skipped (use --no_tokenizer to silence this)", file=sys.stderr)
        return None


def check_program(raw) -> dict | None:
    """None when the gold program executes to exe_ans, else the mismatch with its reason."""
    qa, table = raw["qa"], raw["table"]
    executed = execute(qa["program"], table)
    if executed is not None and executed == qa["exe_ans"]:
        return None
    return {"id": raw["id"], "program": qa["program"], "exe_ans": qa["exe_ans"], "executed": executed,
            "reason": "invalid program" if executed is None else "wrong value"}


def answer_disagrees(qa) -> bool:
    """FinQA's answer text contradicts exe_ans, beyond the text's rounding and percent scale
    (a few official examples do: SFT targets then carry a wrong answer text)."""
    answer, exe_ans = qa["answer"], qa["exe_ans"]
    if isinstance(exe_ans, str):
        return answer.strip() != exe_ans
    match = re.search(r"-?\d[\d,]*\.?\d*", answer)
    if not match:
        return True
    text = match.group().replace(",", "")
    tolerance = 1.01 * 10 ** -(len(text.partition(".")[2]))
    return all(abs(float(text) - target) > tolerance for target in (exe_ans, exe_ans * 100))


def text_lengths(texts: list[str], tokenizer) -> dict:
    stats = {"words": describe([len(text.split()) for text in texts])}
    if tokenizer is not None and texts:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        stats["tokens"] = describe([len(row) for row in ids])
    return stats


def check_split(split: str, examples: list, tokenizer, max_prompt_tokens: int) -> dict:
    """Schema, ids, tables, gold programs and statistics of one split."""
    problems, notes, usable = [], [], []
    for position, raw in enumerate(examples):
        found = validate_example(raw)
        label = raw.get("id") if isinstance(raw, dict) and raw.get("id") else f"#{position}"
        errors = [p for p in found if not p.startswith(NOTE_PREFIX)]
        if errors:
            problems.append({"id": label, "problems": errors})
        else:
            usable.append(raw)
        if len(errors) < len(found):
            notes.append({"id": label, "notes": [p for p in found if p.startswith(NOTE_PREFIX)]})

    ids = Counter(raw["id"] for raw in usable)
    mismatches = [m for m in (check_program(raw) for raw in usable) if m is not None]
    ops, steps = Counter(), Counter()
    for raw in usable:
        tokens = tokenize(raw["qa"]["program"])
        program_ops = [token[:-1] for token in tokens if token.endswith("(")]
        ops.update(program_ops)
        steps[len(program_ops)] += 1
    rows = [len(raw["table"]) for raw in usable]
    columns = [len(row) for raw in usable for row in raw["table"]]

    stats = {
        "question": text_lengths([raw["qa"]["question"] for raw in usable], tokenizer),
        "context_retrieved": text_lengths([build_context(raw, "retrieved") for raw in usable], tokenizer),
        "context_gold": text_lengths([build_context(raw, "gold") for raw in usable], tokenizer),
        "context_full": text_lengths([build_context(raw, "full") for raw in usable], tokenizer),
    }
    if tokenizer is not None and usable:
        # How much of the full-context prompt the configured budget would cut.
        full_prompt = [count_prompt_tokens(build_prompt(raw["qa"]["question"], build_context(raw, "full")),
                                           tokenizer) for raw in usable]
        stats["prompt_full_tokens"] = describe(full_prompt)
        stats["prompt_full_over_budget"] = sum(n > max_prompt_tokens for n in full_prompt)
        stats["max_prompt_tokens"] = max_prompt_tokens

    return {
        "n_examples": len(examples),
        "n_valid_schema": len(usable),
        "schema_problems": problems,
        "notes": notes,
        "duplicate_ids": sorted(i for i, n in ids.items() if n > 1),
        "tables": {"rows": describe(rows), "columns": describe(columns),
                   "n_ragged": len(notes), "n_single_row": sum(n == 1 for n in rows)},
        "n_exec_correct": len(usable) - len(mismatches),
        "exec_mismatches": mismatches,
        "answers": dict(Counter("yes/no" if raw["qa"]["exe_ans"] in ("yes", "no") else "number"
                                for raw in usable)),
        "n_empty_answer_text": sum(not raw["qa"]["answer"].strip() for raw in usable),
        "answer_text_disagrees_with_exe_ans": [
            {"id": raw["id"], "answer": raw["qa"]["answer"], "exe_ans": raw["qa"]["exe_ans"]}
            for raw in usable if answer_disagrees(raw["qa"])],
        "ops": {op: ops[op] for op in OPS if ops[op]} | {op: n for op, n in ops.items() if op not in OPS},
        "program_steps": {str(n): steps[n] for n in sorted(steps)},
        "lengths": stats,
    }


def pick_samples(examples: list, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    chosen = rng.sample(examples, min(count, len(examples)))
    return [{"id": raw["id"], "question": raw["qa"]["question"], "program": raw["qa"]["program"],
             "answer": raw["qa"]["answer"], "exe_ans": raw["qa"]["exe_ans"],
             "context_retrieved": build_context(raw, "retrieved"), "gold_inds": raw["qa"]["gold_inds"],
             "table": raw["table"]} for raw in chosen]


def print_summary(summary: dict) -> None:
    print(f"FinQA data check: {summary['data_root']}")
    for split, report in summary["splits"].items():
        tables = report["tables"]
        print(f"\n[{split}] {report['n_examples']} examples, {report['n_valid_schema']} with a valid "
              f"schema, gold programs executing to exe_ans: {report['n_exec_correct']}/"
              f"{report['n_valid_schema']}")
        print(f"  tables: rows median {tables['rows']['median']} (max {tables['rows']['max']}), "
              f"columns max {tables['columns']['max']}, ragged {tables['n_ragged']}")
        print(f"  ops: {report['ops']}")
        print(f"  program steps: {report['program_steps']}; answers: {report['answers']}")
        for name, stats in report["lengths"].items():
            if isinstance(stats, dict) and "words" in stats:
                tokens = stats.get("tokens")
                extra = f", tokens mean {tokens['mean']} max {tokens['max']}" if tokens else ""
                print(f"  {name}: words mean {stats['words']['mean']} max {stats['words']['max']}{extra}")
        if "prompt_full_over_budget" in report["lengths"]:
            print(f"  full-context prompts over {report['lengths']['max_prompt_tokens']} tokens: "
                  f"{report['lengths']['prompt_full_over_budget']}")
        for title, items in (("schema problems", report["schema_problems"]),
                             ("gold program mismatches", report["exec_mismatches"]),
                             ("answer texts disagreeing with exe_ans (kept)",
                              report["answer_text_disagrees_with_exe_ans"]),
                             ("duplicate ids", report["duplicate_ids"])):
            if items:
                print(f"  {title}: {len(items)}")
                for item in items[:MAX_LISTED]:
                    print(f"    {item}")
    totals = summary["totals"]
    print(f"\ntotal: {totals['n_examples']} examples, {totals['n_exec_correct']} gold programs execute "
          f"to exe_ans, {totals['n_exec_mismatches']} mismatches, {totals['n_schema_problems']} "
          f"with schema problems")


# --- main ---

def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens)
    seed = cfg["training"]["seed"]
    folder = runs.module_dir(args.run_id, MODULE, cfg["paths"]["output_dir"], root=cfg["paths"]["output_root"])
    data_root = Path(args.data_root)
    with runs.Manifest(folder, MODULE, vars(args), cfg, seed) as manifest:
        tokenizer = load_tokenizer_or_none(cfg, args.no_tokenizer)
        splits, samples, file_errors, ids_by_split = {}, {}, [], {}
        for split in args.splits:
            path = data_root / f"{split}.json"
            try:
                examples = load_finqa_split(path)
            except DataError as error:
                file_errors.append(str(error))
                continue
            manifest.add_input(split, path)
            splits[split] = check_split(split, examples, tokenizer, cfg["training"]["max_prompt_tokens"])
            valid = [raw for raw in examples if not [p for p in validate_example(raw)
                                                     if not p.startswith(NOTE_PREFIX)]]
            samples[split] = pick_samples(valid, args.num_samples, seed)
            ids_by_split[split] = {raw["id"] for raw in valid}

        shared_ids = {f"{a}&{b}": sorted(ids_by_split[a] & ids_by_split[b])
                      for i, a in enumerate(ids_by_split) for b in list(ids_by_split)[i + 1:]
                      if ids_by_split[a] & ids_by_split[b]}
        totals = {
            "n_examples": sum(r["n_examples"] for r in splits.values()),
            "n_exec_correct": sum(r["n_exec_correct"] for r in splits.values()),
            "n_exec_mismatches": sum(len(r["exec_mismatches"]) for r in splits.values()),
            "n_schema_problems": sum(len(r["schema_problems"]) for r in splits.values()),
            "n_duplicate_ids": sum(len(r["duplicate_ids"]) for r in splits.values()),
            "n_answer_text_disagreements": sum(len(r["answer_text_disagrees_with_exe_ans"])
                                               for r in splits.values()),
        }
        summary = {"data_root": str(data_root), "tokenizer": None if tokenizer is None
                   else cfg["model"]["name_or_path"], "splits": splits, "totals": totals,
                   "ids_shared_between_splits": shared_ids, "file_errors": file_errors}
        runs.atomic_write_json(folder / "summary.json", summary)
        runs.atomic_write_json(folder / "samples.json", samples)
        manifest.add_output("summary", folder / "summary.json")
        manifest.add_output("samples", folder / "samples.json")
        manifest.metrics.update(totals)
        print_summary(summary)
        if file_errors:
            raise DataError("; ".join(file_errors))
    if args.strict and totals["n_exec_mismatches"]:
        raise cli.JobFailed(f"--strict: {totals['n_exec_mismatches']} gold programs do not execute to exe_ans "
                            f"(listed in {folder / 'summary.json'})")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
