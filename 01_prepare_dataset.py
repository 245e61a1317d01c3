"""Turn FinQA (or synthetic FinQA-format data) into the processed JSONL every later script reads.

    python 01_prepare_dataset.py                                  # retrieved context (the default)
    python 01_prepare_dataset.py --context_mode full --max_prompt_tokens 896
    python 01_prepare_dataset.py --dataset synthetic --num_examples 1000 --seed 0
    python 01_prepare_dataset.py --dataset synthetic --levels 1 --num_examples 1200   # one-step programs

FinQA: datasets/finqa/{train,dev,test}.json -> datasets/finqa_processed/{train,val,test}.jsonl
(dev becomes val). Synthetic: utils/synthetic.py -> datasets/synthetic_processed/; --levels picks
rungs of its difficulty ladder (1: one-step programs, 2: two steps, 3: three steps; several mix in
equal shares). Each line has the fields of DESIGN.md (prompt/completion in TRL's conversational
format) and its level, the gold program's number of steps; the manifest counts rows per level. A FinQA example that
breaks the schema (utils.data.validate_example: a missing or mistyped field, a NaN exe_ans) stops
the run with an error naming it, before anything is written. Context modes:
retrieved (qa.model_input, non-oracle), gold (qa.gold_inds, an ORACLE: label results so), full
(pre_text, table, post_text cut to --max_prompt_tokens with the model's tokenizer; 0 = no cut).
Here --output_dir is the JSONL folder. manifest.json (counts, sha256 of each file) is written
beside the JSONL files and copied to outputs/<run_id>/01_preprocessing/manifest.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils import config as config_lib
from utils import cli, runs
from utils.data import CONTEXT_MODES, GET_DATA_HINT, NOTE_PREFIX, DataError, build_context, load_finqa_split, \
    to_processed, validate_example
from utils.finqa_program import exec_correct
from utils.synthetic import LEVELS, generate

MODULE = "01_preprocessing"
RAW_TO_PROCESSED = {"train": "train", "dev": "val", "test": "test"}  # FinQA file -> JSONL name
QUICK_TEST_EXAMPLES = 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    for action in parser._actions:  # this script's --output_dir is the dataset folder
        if action.dest == "output_dir":
            action.help = ("folder for {train,val,test}.jsonl (default: the config's paths.data_dir "
                           "for finqa, datasets/synthetic_processed for synthetic)")
    parser.add_argument("--dataset", choices=("finqa", "synthetic"), default="finqa")
    parser.add_argument("--context_mode", choices=CONTEXT_MODES, default="retrieved",
                        help="retrieved (default), gold (oracle facts) or full (document, truncated)")
    parser.add_argument("--max_prompt_tokens", type=int, default=None,
                        help="full mode: prompt token budget, 0 = no limit "
                             "(default: the config's training.max_prompt_tokens)")
    parser.add_argument("--data_root", default="datasets/finqa",
                        help="folder with the raw FinQA {train,dev,test}.json (default: %(default)s)")
    parser.add_argument("--num_examples", type=int, default=1000,
                        help="synthetic: examples over all splits, 80/10/10 (default: %(default)s)")
    parser.add_argument("--levels", type=int, nargs="+", choices=LEVELS, default=None,
                        help="synthetic: difficulty levels, the gold program's number of steps, mixed in "
                             "equal shares (default: the whole template mix)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"only the first {QUICK_TEST_EXAMPLES} examples per split")
    return parser.parse_known_args(argv)


# --- helpers ---

def load_raw_splits(args, seed: int, manifest) -> dict[str, list]:
    """{jsonl split name: raw FinQA-format examples}."""
    if args.dataset == "synthetic":
        generated = generate(args.num_examples, seed, levels=args.levels)
        return {RAW_TO_PROCESSED[split]: examples for split, examples in generated.items()}
    splits = {}
    for raw_split, split in RAW_TO_PROCESSED.items():
        path = Path(args.data_root) / f"{raw_split}.json"
        splits[split] = require_valid(path, load_finqa_split(path))
        manifest.add_input(raw_split, path)
    return splits


def require_valid(path: Path, examples: list) -> list:
    """The examples of one FinQA file, or a DataError naming the first broken example and its fields:
    a corrupt file must not become a smaller processed split (evaluation must see every example)."""
    broken = [(position, raw, problems) for position, raw in enumerate(examples)
              if (problems := [p for p in validate_example(raw) if not p.startswith(NOTE_PREFIX)])]
    if broken:
        position, raw, problems = broken[0]
        example_id = runs.short_repr(raw.get("id") if isinstance(raw, dict) else None)
        more = f" (and {len(broken) - 1} more broken examples)" if len(broken) > 1 else ""
        raise DataError(f"{path}: example {position} (id {example_id}): {'; '.join(problems)}{more}. List every "
                        f"problem with python 00_check_data.py --data_root {path.parent}; re-download the data "
                        f"with {GET_DATA_HINT}")
    return examples


def load_tokenizer_for_full(cfg, max_prompt_tokens: int):
    if not max_prompt_tokens:
        return None
    try:
        from utils.modeling import load_tokenizer
        return load_tokenizer(cfg)
    except Exception as error:
        raise DataError(f"--context_mode full needs the tokenizer of {cfg['model']['name_or_path']} "
                        f"to cut prompts to {max_prompt_tokens} tokens, and it did not load ({error}). "
                        "Run bash setup.sh, or pass --max_prompt_tokens 0 to keep whole documents.") from None


def process_split(split, examples, args, source, tokenizer, max_prompt_tokens) -> tuple[list, dict]:
    rows, dropped, mismatches, truncated = [], [], 0, 0
    for position, raw in enumerate(examples):
        try:
            row = to_processed(raw, split, args.context_mode, source=source, tokenizer=tokenizer,
                               max_prompt_tokens=max_prompt_tokens)
        except DataError as error:  # malformed (no question/program/facts): cannot be a target
            dropped.append({"position": position, "reason": str(error)})
            continue
        # Kept: FinQA's own label, and evaluation must see the same examples whatever we think.
        mismatches += not exec_correct(row["target_program"], row["table"], row["exe_ans"])
        if args.context_mode == "full" and tokenizer is not None:
            truncated += row["context"] != build_context(raw, "full")
        rows.append(row)
    levels = [row["level"] for row in rows]
    stats = {"n_raw": len(examples), "n_written": len(rows), "n_dropped": len(dropped),
             "dropped": dropped, "n_gold_program_mismatch_kept": mismatches,
             "levels": {str(level): levels.count(level) for level in sorted(set(levels))}}
    if args.context_mode == "full":
        stats["n_context_truncated"] = truncated
    return rows, stats


# --- main ---

def main(args, extra_tokens=()) -> dict:
    cfg = config_lib.from_args(args, extra_tokens)
    seed = cfg["training"]["seed"]
    source = args.dataset
    if args.levels and source != "synthetic":
        raise cli.UsageError(f"--levels {' '.join(map(str, args.levels))} picks rungs of the synthetic ladder: "
                             "add --dataset synthetic (FinQA rows record their level, the step count, anyway)")
    default_dir = cfg["paths"]["data_dir"] if source == "finqa" else "datasets/synthetic_processed"
    out_dir = Path(cfg["paths"]["output_dir"] or default_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_folder = runs.module_dir(args.run_id, MODULE, root=cfg["paths"]["output_root"])
    max_prompt_tokens = (cfg["training"]["max_prompt_tokens"] if args.max_prompt_tokens is None
                         else args.max_prompt_tokens)
    if args.context_mode != "full":
        max_prompt_tokens = None  # the budget only applies to full documents

    manifest = runs.Manifest(out_dir, MODULE, vars(args), cfg, seed)
    try:
        with manifest:
            # --- data ---
            raw_splits = load_raw_splits(args, seed, manifest)
            tokenizer = load_tokenizer_for_full(cfg, max_prompt_tokens) if args.context_mode == "full" else None
            # --- process ---
            print(f"{source} -> {out_dir} (context: {args.context_mode}"
                  f"{', an ORACLE' if args.context_mode == 'gold' else ''}"
                  f"{f', max {max_prompt_tokens} prompt tokens' if max_prompt_tokens else ''})")
            files = {}
            for split, examples in raw_splits.items():
                if args.quick_test:
                    examples = examples[:QUICK_TEST_EXAMPLES]
                rows, stats = process_split(split, examples, args, source, tokenizer, max_prompt_tokens)
                path = runs.atomic_write_jsonl(out_dir / f"{split}.jsonl", rows)
                files[split] = {"path": str(path), "sha256": runs.sha256_file(path), **stats}
                manifest.add_output(split, path)
                print(f"  {split}: {stats['n_written']} written, {stats['n_dropped']} dropped, "
                      f"{stats['n_gold_program_mismatch_kept']} kept whose gold program does not "
                      f"execute to exe_ans" + (f", {stats['n_context_truncated']} contexts truncated"
                                               if "n_context_truncated" in stats else "")
                      + "; levels (steps) " + ", ".join(f"{k}: {v}" for k, v in stats["levels"].items()))
                for drop in stats["dropped"]:
                    print(f"    dropped example {drop['position']}: {drop['reason']}")
            manifest.metrics.update({
                "source": source, "context_mode": args.context_mode,
                "oracle_context": args.context_mode == "gold",
                "max_prompt_tokens": max_prompt_tokens, "quick_test": args.quick_test,
                "counts": {split: info["n_written"] for split, info in files.items()},
                "files": files,
            })
            if source == "synthetic":
                manifest.metrics["synthetic"] = {"num_examples": args.num_examples, "seed": seed,
                                                 "levels": args.levels or "mix"}
    finally:
        if manifest.path.is_file():
            runs.atomic_write_text(run_folder / "manifest.json", manifest.path.read_text(encoding="utf-8"))
    print(f"manifest: {manifest.path} (copy in {run_folder})")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
