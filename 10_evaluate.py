"""Evaluate a policy on FinQA: greedy generation, official execution/program accuracy, rewards.

    python 10_evaluate.py                                        # zero-shot base model -> 10_evaluation/base/
    python 10_evaluate.py --policy_ckpt outputs/run_001/03_sft   # its ckpt_sft/best -> 10_evaluation/sft/
    python 10_evaluate.py --policy_ckpt outputs/run_001/06_grpo/ckpt_grpo/final --split val
    python 10_evaluate.py --predictions my_preds.json --policy_name finqanet   # score outside predictions
    python 10_evaluate.py --quick_test                           # 16 examples, a smoke run
    python 10_evaluate.py --policy_ckpt outputs/run_001/03_sft --num_samples 4 --temperature 0.8 --top_p 1.0

Greedy decoding is the default. --num_samples K adds K sampled completions per prompt (beside the greedy
one): metrics.json gains sampled_<metric> = the mean over prompts of each prompt's mean over its K samples
(the expected score of one sample, what RL optimizes), with bootstrap CIs over prompts, and
sampled_exec_pass_at_k; breakdown.csv gains each prompt's sampled means and whether any sample was right. On 100 prompts the sampled
means' CIs are much narrower than greedy's 0/1 outcomes give.

--policy_ckpt: a checkpoint folder (LoRA adapter or full model), or a ckpt_<method> or module folder
(03_sft, 06_grpo) whose ckpt_*/best is used. --predictions scores completions made elsewhere, with no
model: JSONL of {"id", "completion"}, or FinQA's official format, a JSON list (or JSONL) of {"id",
"predicted": [program tokens..., "EOF"]}, whose exec_acc/prog_acc are computed on the tokens exactly as
the official evaluate.py does. Examples without a prediction count as wrong (the official scorer
divides by the number of predictions: compare n_predictions). Writes metrics.json (names: utils/metrics.py),
breakdown.csv, samples/predictions.jsonl and manifest.json to outputs/<run_id>/10_evaluation/<policy_name>/.
Same checkpoint, data and seed -> same metrics.json, except wall_time_s and tokens_per_s.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import time
from pathlib import Path

from utils import cli, runs
from utils import config as config_lib
from utils.data import REWARD_FIELDS, program_level, read_processed
from utils.metrics import aggregate, aggregate_samples, failure_counts, format_table, score_official
from utils.rewards import COMPONENTS, RewardSpec, load_spec, score, spec_to_yaml

MODULE = "10_evaluation"
QUICK_TEST_EXAMPLES = 16
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
FACTS = ("exec_correct", "program_equivalent", "answer_correct", "numeric_close", "format_valid", "program_valid")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    helps = {"batch_size": "prompts per generation batch (default: the config's generation.batch_size)",
             "output_dir": "write here instead of outputs/<run_id>/10_evaluation/<policy_name>/"}
    for action in parser._actions:  # here --batch_size is the generation batch, not training's
        action.help = helps.get(action.dest, action.help)
    add = parser.add_argument
    add("--policy_ckpt", help="checkpoint, ckpt_<method> or module folder (its ckpt_*/best); omitted: base model")
    add("--split", choices=("train", "val", "test"), default="test")
    add("--test_jsonl", help="a processed JSONL to evaluate (overrides --split)")
    add("--data_dir", help="processed data folder (default: the config's paths.data_dir)")
    add("--reward_spec", help="default: outputs/<run_id>/02_rewards/reward_spec.yaml if present, else RewardSpec()")
    add("--policy_name", help="folder under 10_evaluation/ (default: base, the checkpoint's method, predictions stem)")
    add("--max_examples", type=int, help="evaluate the first N examples only")
    add("--max_new_tokens", type=int, help="generation budget (default: the config's generation.max_new_tokens)")
    add("--quick_test", action="store_true", help=f"only the first {QUICK_TEST_EXAMPLES} examples")
    add("--predictions", help="score this predictions file instead of generating (see above)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples for the *_ci95 (0 = none)")
    add("--num_samples", type=int, default=0,
        help="also sample K completions per prompt and report their means and pass@K (default: 0, greedy only)")
    add("--temperature", type=float, help="sampling temperature (default: the config's generation.temperature)")
    add("--top_p", type=float, help="nucleus sampling (default: the config's generation.top_p)")
    return parser.parse_known_args(argv)


# --- inputs ---

def derive_policy_name(checkpoint: Path) -> str:
    """ckpt_sft/best -> sft, ckpt_grpo/step_50 -> grpo_step_50, 03_sft/x -> sft, else the folder name."""
    parts = checkpoint.parts
    for index in range(len(parts) - 1, -1, -1):
        if parts[index].startswith("ckpt_") and len(parts[index]) > 5:
            rest = [p for p in parts[index + 1:] if p != "best"]
            return "_".join([parts[index][5:], *rest])
    modules = [match.group(1) for match in map(re.compile(r"\d\d_(\w+)").fullmatch, parts) if match]
    return modules[-1] if modules else checkpoint.resolve().name


def load_examples(path: Path, limit: int | None) -> tuple[list[dict], list[dict]]:
    """(evaluated examples, all examples) of a processed JSONL."""
    if not path.is_file():
        raise cli.UsageError(f"data file {path} not found: run `python 01_prepare_dataset.py` (writes "
                        f"{path.parent}/{{train,val,test}}.jsonl), or pass --test_jsonl FILE")
    examples = read_processed(path, required=("id", *REWARD_FIELDS))  # the prompt only where a model generates
    return (examples[:limit] if limit is not None else examples), examples


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions file (JSON list or JSONL); errors name the file and line/entry."""
    if not path.is_file():
        raise cli.UsageError(f"--predictions {path}: no such file")
    hint = 'expected {"id", "completion": text} or {"id", "predicted": [tokens..., "EOF"]}'
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise cli.UsageError(f"{path}: line {line}: not UTF-8 text ({error.reason}); {hint}") from None
    whole = text.lstrip().startswith("[")  # the official format is one JSON list
    pieces = [(1, text)] if whole else [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    located = []
    for lineno, piece in pieces:
        try:
            value = json.loads(piece)
        except (json.JSONDecodeError, RecursionError) as error:  # json recurses once per bracket
            where, problem = ((lineno + error.lineno - 1, error.msg) if isinstance(error, json.JSONDecodeError)
                              else (lineno, "nested too deeply to read"))
            raise cli.UsageError(f"{path}: line {where}: invalid JSON ({problem}); {hint}") from None
        located += [(f"entry {i}", row) for i, row in enumerate(value)] if whole else [(f"line {lineno}", value)]
    if not located:
        raise cli.UsageError(f"{path} holds no predictions: {hint}, one per example")
    seen = set()
    for where, row in located:
        tokens = row.get("predicted") if isinstance(row, dict) else None
        if not (isinstance(row, dict) and "id" in row and (isinstance(row.get("completion"), str) or (
                isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)))):
            raise cli.UsageError(f"{path}: {where}: {hint}, got {json.dumps(row)[:120]}")
        if str(row["id"]) in seen:
            raise cli.UsageError(f"{path}: {where}: id {row['id']!r} appears twice")
        seen.add(str(row["id"]))
    return [row for _, row in located]


# --- scoring ---

def score_predictions(examples, all_examples, predictions, spec, path):
    """(results, sample rows, n_predictions, n_missing) for predictions made elsewhere."""
    by_id = {str(row["id"]): row for row in predictions}
    known = {str(example.get("id")) for example in all_examples}
    if unknown := [i for i in by_id if i not in known]:
        raise cli.UsageError(f"{path}: {len(unknown)} prediction ids are not in the data (wrong --split or "
                        f"--test_jsonl?), e.g. {unknown[:5]}")
    results, rows = [], []
    for example in examples:
        prediction = by_id.get(str(example.get("id")))
        tokens = prediction.get("predicted") if prediction else None
        if tokens is not None:  # official format: exec_acc/prog_acc on the token list itself
            completion, result = score_official(tokens, example, spec)
        else:
            completion = prediction["completion"] if prediction else ""
            result = score(completion, example, spec)
        results.append(result)
        rows.append(sample_row(example, completion, None, result, predicted=tokens, missing=prediction is None))
    matched = sum(str(example.get("id")) in by_id for example in examples)
    return results, rows, matched, len(examples) - matched


def generate_completions(cfg, checkpoint, examples, args, seed):
    """(greedy outputs, sampled outputs or None, wall_time_s, dtype, device): utils.generation.generate's
    {"completions", "num_tokens"} per example, greedy, then args.num_samples sampled ones."""
    from utils.generation import generate
    from utils.modeling import load_model, load_tokenizer

    if missing := [str(e.get("id")) for e in examples if not isinstance(e.get("prompt"), list)]:
        raise cli.UsageError(f"examples without a chat 'prompt', e.g. {missing[:3]}: rerun `python 01_prepare_dataset.py`")
    reference = str(checkpoint) if checkpoint else cfg
    model = load_model(reference, dtype=cfg["model"]["dtype"])
    tokenizer = load_tokenizer(reference)
    runs.seed_everything(seed)
    started = time.perf_counter()
    prompts, name = [e["prompt"] for e in examples], str(checkpoint) if checkpoint else cfg["model"]["name_or_path"]
    try:
        greedy = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          do_sample=False, seed=seed, desc="evaluating", checkpoint=name)
        sampled = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           do_sample=True, temperature=args.temperature, top_p=args.top_p,
                           num_return_sequences=args.num_samples, seed=seed, desc=f"sampling {args.num_samples}",
                           checkpoint=name) if args.num_samples else None
    except ValueError as error:  # a prompt longer than the context allows
        raise cli.UsageError(str(error)) from None
    wall, weight = time.perf_counter() - started, next(model.parameters())
    return greedy, sampled, wall, str(weight.dtype).replace("torch.", ""), str(weight.device)


def by_level(examples, results, sampled_results=None) -> dict:
    """exec_acc per difficulty level (gold program steps), greedy and, with samples, sampled (the mean
    over prompts of each prompt's mean over its samples) and pass@K: {"1": {"n", "exec_acc", ...}}."""
    groups: dict = {}
    for index, example in enumerate(examples):
        groups.setdefault(example_level(example), []).append(index)
    table = {}
    for level in sorted(groups, key=lambda value: (value is None, value)):
        indices = groups[level]
        row = {"n": len(indices), "exec_acc": sum(results[i].exec_correct for i in indices) / len(indices)}
        if sampled_results:
            row["sampled_exec_acc"] = sum(sum(r.exec_correct for r in sampled_results[i]) / len(sampled_results[i])
                                          for i in indices) / len(indices)
            row["sampled_exec_pass_at_k"] = sum(any(r.exec_correct for r in sampled_results[i])
                                                for i in indices) / len(indices)
        table[str(level)] = row
    return table


def sample_row(example, completion, num_tokens, result, predicted=None, missing=False, samples=None) -> dict:
    """One predictions.jsonl row; `samples`: the prompt's sampled (completion, num_tokens, result)s."""
    return {"id": example.get("id"), "question": example.get("question"), "completion": completion,
            "num_tokens": num_tokens, "reward": result.total,
            "reward_components": {c: getattr(result, c) for c in COMPONENTS}, "category": result.category,
            **({"predicted": predicted} if predicted is not None else {}),
            **({"missing_prediction": True} if missing else {}),
            **({"samples": [{"completion": t, "num_tokens": n, "reward": r.total, "category": r.category}
                            for t, n, r in samples]} if samples is not None else {})}


SAMPLED_COLUMNS = {"sampled_exec_acc": lambda r: r.exec_correct, "sampled_format_rate": lambda r: r.format_valid,
                   "sampled_reward_mean": lambda r: r.total}


def example_level(example) -> int | None:
    """The example's difficulty level (its gold program's steps): the processed row's, else counted."""
    level = example.get("level")
    if isinstance(level, int):
        return level
    program = example.get("target_program")
    return program_level(program) if isinstance(program, str) else None


def breakdown_csv(examples, results, sampled_results=None) -> str:
    """One row per example: its level, what was predicted, what it executed to, the gold, each fact;
    with sampled results, the example's mean over its samples of exec_acc, format_rate and reward,
    and whether any sample executed right (sampled_exec_pass; empty columns without)."""
    rows = [{"id": e.get("id"), "level": example_level(e), "predicted_program": r.predicted_program,
             "executed_value": r.executed_value, "gold_program": e.get("target_program"), "exe_ans": e.get("exe_ans"),
             **{fact: getattr(r, fact) for fact in FACTS}, "reward": r.total, "category": r.category,
             **{name: sum(map(fact, samples)) / len(samples) if samples else "" for name, fact in SAMPLED_COLUMNS.items()},
             "sampled_exec_pass": any(x.exec_correct for x in samples) if samples else ""}
            for e, r, samples in zip(examples, results, sampled_results or [None] * len(examples))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- main ---

def main(args, extra_tokens=()) -> dict:
    # --batch_size is the generation batch here: keep it out of training.per_device_train_batch_size
    cfg = config_lib.from_args(argparse.Namespace(**{**vars(args), "batch_size": None}), extra_tokens)
    return evaluate(args, cfg)


def evaluate(args, cfg) -> dict:
    seed, paths = cfg["training"]["seed"], cfg["paths"]
    args.batch_size = args.batch_size or cfg["generation"]["batch_size"]
    args.max_new_tokens = args.max_new_tokens or cfg["generation"]["max_new_tokens"]
    args.temperature = cfg["generation"]["temperature"] if args.temperature is None else args.temperature
    args.top_p = cfg["generation"]["top_p"] if args.top_p is None else args.top_p
    if args.max_examples is not None and args.max_examples < 1:
        raise cli.UsageError(f"--max_examples must be at least 1, got {args.max_examples}")
    if args.num_samples < 0 or (args.num_samples and (args.temperature <= 0 or not 0 < args.top_p <= 1)):
        raise cli.UsageError(f"--num_samples {args.num_samples} --temperature {args.temperature} --top_p {args.top_p}: "
                             f"need K >= 0, a temperature > 0 and 0 < top_p <= 1")
    limit = min(args.max_examples or 10**9, QUICK_TEST_EXAMPLES if args.quick_test else 10**9)

    # --- inputs ---
    data_file = Path(args.test_jsonl or Path(args.data_dir or paths["data_dir"]) / f"{args.split}.jsonl")
    examples, all_examples = load_examples(data_file, limit)
    predictions_path = Path(args.predictions) if args.predictions else None
    if args.policy_ckpt and predictions_path:
        raise cli.UsageError("--policy_ckpt and --predictions exclude each other: predictions need no model")
    if predictions_path and args.num_samples:
        raise cli.UsageError("--num_samples samples from a model: it does not apply to --predictions")
    predictions = read_predictions(predictions_path) if predictions_path else None
    if args.policy_ckpt:
        from utils.modeling import resolve_checkpoint  # torch: imported only where a model is used
    checkpoint = Path(resolve_checkpoint(args.policy_ckpt)) if args.policy_ckpt else None
    default_spec = Path(paths["output_root"]) / args.run_id / "02_rewards" / "reward_spec.yaml"
    spec_path = Path(args.reward_spec) if args.reward_spec else (default_spec if default_spec.is_file() else None)
    try:
        spec = load_spec(spec_path) if spec_path else RewardSpec()
    except (FileNotFoundError, ValueError) as error:
        raise cli.UsageError(str(error)) from None
    spec_sha = runs.sha256_file(spec_path) if spec_path else hashlib.sha256(spec_to_yaml(spec).encode()).hexdigest()
    policy_name = args.policy_name or (predictions_path.stem if predictions_path else
                                       derive_policy_name(checkpoint) if checkpoint else "base")
    if not NAME_PATTERN.fullmatch(policy_name) or set(policy_name) == {"."}:
        raise cli.UsageError(f"--policy_name {policy_name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    folder = runs.module_dir(args.run_id, f"{MODULE}/{policy_name}", paths["output_dir"], paths["output_root"])

    with runs.Manifest(folder, MODULE, vars(args), cfg, seed) as manifest:
        for name, path in (("data", data_file), ("predictions", predictions_path), ("checkpoint", checkpoint),
                           ("reward_spec", spec_path)):
            if path:
                manifest.add_input(name, path)
        print(f"evaluating {policy_name} on {len(examples)} examples of {data_file}")
        info = dict.fromkeys(("n_predictions", "n_missing_predictions", "dtype", "device"))
        tokens_generated = wall = sampled_results = None
        # --- score ---
        if predictions_path:
            results, rows, matched, missing = score_predictions(examples, all_examples, predictions, spec,
                                                                predictions_path)
            info.update(n_predictions=matched, n_missing_predictions=missing)
            if missing:
                print(f"warning: {missing} of {len(examples)} examples have no prediction and count as wrong "
                      f"({matched} predictions matched)", file=sys.stderr)
        else:
            greedy, sampled, wall, info["dtype"], info["device"] = generate_completions(cfg, checkpoint, examples,
                                                                                       args, seed)
            results = [score(out["completions"][0], e, spec) for out, e in zip(greedy, examples)]
            outputs = greedy + (sampled or [])
            tokens_generated = sum(n for out in outputs for n in out["num_tokens"])
            if sampled:
                sampled_results = [[score(t, e, spec) for t in out["completions"]] for out, e in zip(sampled, examples)]
            rows = [sample_row(e, out["completions"][0], out["num_tokens"][0], r, samples=None if not sampled else
                               list(zip(sampled[i]["completions"], sampled[i]["num_tokens"], sampled_results[i])))
                    for i, (e, out, r) in enumerate(zip(examples, greedy, results))]

        # --- write ---
        metrics = {"policy_name": policy_name, "mode": "predictions" if predictions_path else "greedy",
                   "checkpoint": str(checkpoint) if checkpoint else None,
                   "model": None if predictions_path else str(checkpoint or cfg["model"]["name_or_path"]),
                   "split": None if args.test_jsonl else args.split, "data_file": str(data_file),
                   "data_sha256": manifest.inputs["data"]["sha256"], "reward_spec": str(spec_path or "defaults"),
                   "reward_spec_sha256": spec_sha, "seed": seed, "bootstrap_resamples": args.bootstrap,
                   "max_new_tokens": None if predictions_path else args.max_new_tokens, **info,
                   **aggregate(results, tokens_generated, wall, seed=seed, n_resamples=args.bootstrap),
                   "failure_counts": failure_counts(results), "num_samples": args.num_samples,
                   "by_level": by_level(examples, results, sampled_results),
                   **({"sample_temperature": args.temperature, "sample_top_p": args.top_p,
                       **aggregate_samples(sampled_results, seed=seed, n_resamples=args.bootstrap)}
                      if sampled_results else {})}
        manifest.add_output("metrics", runs.atomic_write_json(folder / "metrics.json", metrics))
        manifest.add_output("breakdown", runs.atomic_write_text(folder / "breakdown.csv",
                                                                breakdown_csv(examples, results, sampled_results)))
        manifest.add_output("predictions", runs.atomic_write_jsonl(folder / "samples" / "predictions.jsonl", rows))
        manifest.metrics.update(metrics)

    print("\n" + format_table(metrics))
    speed = f", {metrics['tokens_per_s']:.1f} tokens/s" if metrics["tokens_per_s"] else ""
    print(f"n_examples {metrics['n_examples']}{speed}; categories {metrics['failure_counts']}\nwrote {folder}")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
