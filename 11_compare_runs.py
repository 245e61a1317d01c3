"""Compare evaluated policies: summary table, seed statistics, paired tests against a baseline, plots, report.

    python 11_compare_runs.py 'outputs/run_001/10_evaluation/*/metrics.json'
    python 11_compare_runs.py 'outputs/run_*/10_evaluation/*/metrics.json' --run_id sweep --baseline sft
    python 11_compare_runs.py outputs/run_001/10_evaluation --bootstrap 500 --output_dir /tmp/comparison
    python 11_compare_runs.py 'tests/fixtures/compare/run_cmp/10_evaluation/*/metrics.json' --output_dir /tmp/cmp

Inputs are metrics.json files of 10_evaluate.py (paths, quoted globs, or 10_evaluation folders); each
folder's breakdown.csv gives the per-item correctness for the paired tests. The method and seed come from
the policy name (grpo, grpo_seed2, grpo-s2), else the training manifest (the module folder of the evaluated
checkpoint, e.g. 06_grpo/), else metrics.json. Writes summary.csv (numbers exactly as in metrics.json;
num_samples is 0 and the sampled_* metrics of 10_evaluate.py --num_samples K blank when greedy only),
seeds_summary.csv, paired.csv (exec_acc difference, paired bootstrap CI, McNemar vs --baseline),
plots/*.png, report.md and manifest.json to outputs/<run>/11_comparison/ (<run>: the inputs' common run,
else --run_id). Statistics and tables: utils/comparison.py; figures: utils/plots.py.

Paired tests: when a policy and the baseline both have per-item sampled means (breakdown.csv's
sampled_exec_acc) on every shared item, the paired bootstrap is over those means (paired_on "sampled mean
of K=4"; warned when their sampling settings differ) and significant = its CI excludes 0; otherwise it is
over greedy exec_correct (paired_on "greedy") and significant = CI excludes 0 and McNemar p < 0.05.
McNemar is always on greedy exec_correct.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
import sys
from pathlib import Path

import yaml

from utils import comparison as cmp
from utils import config as config_lib
from utils import cli, plots, runs
from utils.metrics import bootstrap_ci

MODULE = "11_comparison"
RERUN = "rerun `python 10_evaluate.py` for this policy"
TRAIN_MODULES = {"sft": "03_sft", "ppo": "05_ppo", "grpo": "06_grpo", "rloo": "07_rloo", "dpo": "09_dpo"}
# names a training manifest may give its token count / peak memory (GB per unit): first found wins
TOKEN_KEYS = ("train_tokens", "tokens_seen", "num_tokens", "total_tokens", "tokens_trained")
MEMORY_KEYS = {"peak_memory_gb": 1.0, "peak_gpu_memory_gb": 1.0, "peak_memory_mb": 1 / 1024, "peak_rss_gb": 1.0}
PLOTS = {"reward_vs_method": plots.bars_by_policy, "efficiency_vs_quality": plots.efficiency_vs_quality,
         "training_curves": plots.training_curves, "score_vs_seed": plots.score_vs_seed}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    parser.add_argument("metrics", nargs="+", help="metrics.json files, quoted globs, or 10_evaluation folders")
    parser.add_argument("--baseline", default="sft", help="policy name or method every other policy is tested against")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default: 2000)")
    return parser.parse_known_args(argv)


# --- inputs ---

def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def expand_inputs(patterns) -> list[Path]:
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for item in map(Path, found):
            paths += sorted(item.glob("*/metrics.json")) if item.is_dir() else [item]
        if not found:
            warn(f"{pattern!r} matches no file")
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise cli.UsageError(f"no such metrics file: {', '.join(missing)}; run `python 10_evaluate.py` first")
    if not paths:
        raise cli.UsageError("no metrics.json found: pass outputs/<run>/10_evaluation/*/metrics.json")
    unique = {}
    for path in paths:  # one entry per file, however it was named
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_optional(path: Path, what: str):
    """A JSON or YAML file, or None (with a warning when it exists but cannot be read)."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError, OSError) as error:
        warn(f"skipping {what} {path}: {error}")
        return None


def run_of(path: Path) -> str | None:
    """outputs/<run>/10_evaluation/<policy>/metrics.json -> <run>."""
    path = path.resolve()
    return path.parents[2].name if len(path.parents) > 2 and path.parents[1].name == "10_evaluation" else None


def training_folder(metrics: dict, path: Path, method: str, name: str) -> Path | None:
    """The training module behind a policy: the checkpoint's NN_module ancestor, else <run>/NN_<method>."""
    if checkpoint := metrics.get("checkpoint"):
        for folder in (Path(checkpoint), *Path(checkpoint).parents):
            if re.fullmatch(r"\d\d_\w+", folder.name) and (folder / "manifest.json").is_file():
                return folder
    if method in TRAIN_MODULES and name == method and run_of(path):  # only then is <run>/NN_<method> its own
        guess = path.resolve().parents[2] / TRAIN_MODULES[method]
        return guess if guess.is_dir() else None
    return None


def read_training_log(folder: Path | None) -> list[dict]:
    """Entries of <folder>/logs/training_log.json; [] when absent or unreadable (with a warning)."""
    path = folder / "logs" / "training_log.json" if folder else None
    if not path or not path.is_file():
        return []
    try:
        return cmp.parse_training_log(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as error:
        warn(f"skipping training log {path}: {error}")
        return []


def data_facts(data_file) -> dict:
    """context_mode and source of the evaluated data, from its first JSONL row ("unknown" if unreadable)."""
    facts = {"context_mode": "unknown", "dataset_source": "unknown"}
    path = next((p for p in (Path(data_file), runs.REPO_ROOT / data_file) if p.is_file()), None) if data_file else None
    if path:
        with path.open(encoding="utf-8") as handle:
            line = next((line for line in handle if line.strip()), "{}")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return facts
        for key, field in (("context_mode", "context_mode"), ("dataset_source", "source")):
            facts[key] = str(row.get(field) or facts[key]) if isinstance(row, dict) else facts[key]
    return facts


def is_number(value) -> bool:
    """A finite int or float (json reads NaN and Infinity as floats; no metric is either)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_cell(row: dict, column: str, path: Path, line: int) -> float | None:
    """A breakdown.csv cell as a finite float; None when the column is absent or the cell empty."""
    text = (row.get(column) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise cli.UsageError(f"{path}: line {line}: {column} should be a finite number, got {text[:60]!r}; {RERUN}")
    return value


def read_breakdown(path: Path) -> dict[str, dict]:
    """breakdown.csv rows by id (exec_correct as bool; reward and sampled_exec_acc, the item's mean over its
    sampled completions, as float or None: empty when greedy only, absent before sampling). {} when there is
    no breakdown.csv (a warning: no paired test); a broken one is an error naming the line and column."""
    if not path.is_file():
        warn(f"{path}: missing: no paired test for this policy")
        return {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)  # not DictReader: its line_num lags behind on a broken line
            header = next(reader, [])
            rows = [(reader.line_num, values) for values in reader if values]  # blank lines skipped, as DictReader does
    except UnicodeDecodeError as error:
        raise cli.UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); {RERUN}") from None
    except csv.Error as error:  # e.g. a field over csv's size limit
        raise cli.UsageError(f"{path}: line {reader.line_num}: {error}; {RERUN}") from None
    if missing := [column for column in ("id", "exec_correct") if column not in header]:
        raise cli.UsageError(f"{path}: no {', '.join(missing)} column (an empty file?); {RERUN}")
    items = {}
    for line, values in rows:
        if len(values) != len(header):
            raise cli.UsageError(f"{path}: line {line}: {len(values)} fields, the header has {len(header)}: "
                                 f"the file is cut short or damaged; {RERUN}")
        row = dict(zip(header, values))
        correct = row["exec_correct"].strip().lower()
        if correct not in ("true", "false", "1", "0"):
            raise cli.UsageError(f"{path}: line {line}: exec_correct should be True or False, got "
                                 f"{row['exec_correct'][:60]!r}; {RERUN}")
        items[row["id"]] = {"exec_correct": correct in ("true", "1"), "reward": number_cell(row, "reward", path, line),
                            "sampled_exec_acc": number_cell(row, "sampled_exec_acc", path, line)}
    return items


def training_facts(train: dict, log: list[dict]) -> dict:
    """Wall time, tokens, device, device-hours and peak memory of a training manifest and log."""
    numbers = train.get("metrics") or {}
    wall, device = train.get("duration_s"), str(train.get("device") or "unknown")
    devices = int(found[1]) if (found := re.search(r" x(\d+)$", device)) else 1  # runs.device_name: "cuda:X x2"
    return {"train_wall_time_s": wall,
            "train_tokens": next((numbers[k] for k in TOKEN_KEYS if numbers.get(k) is not None),
                                 cmp.tokens_from_log(log)),
            "compute_device": device if wall is not None else None,
            "compute_hours": wall * devices / 3600 if wall is not None else None,
            "peak_memory_gb": next((numbers[k] * scale for k, scale in MEMORY_KEYS.items()
                                    if numbers.get(k) is not None), None)}


def sampled_facts(metrics: dict) -> dict:
    """num_samples (0: greedy only, as for a metrics.json from before sampling), the sampling settings and the
    sampled metrics of 10_evaluate.py --num_samples K; all but num_samples None when greedy only."""
    k = int(metrics.get("num_samples") or 0)
    ci = (metrics.get("sampled_exec_acc_ci95") if k else None) or [None, None]
    return {**{key: metrics.get(key) if k else None for key in (*cmp.SAMPLING, *cmp.SAMPLED)}, "num_samples": k,
            "sampled_exec_acc_ci_low": ci[0], "sampled_exec_acc_ci_high": ci[1]}


def check_metrics(metrics, path: Path) -> None:
    """The metrics.json fields read here are there and hold finite numbers; errors name the file and field."""
    if not isinstance(metrics, dict):
        raise cli.UsageError(f"{path}: expected a JSON object of metrics, got {type(metrics).__name__}; {RERUN}")
    if missing := [key for key in (*cmp.RATES, "reward_mean", "n_examples") if key not in metrics]:
        raise cli.UsageError(f"{path}: no {', '.join(missing)}: not a metrics.json of 10_evaluate.py; {RERUN}")
    optional = [key for key in (*cmp.SAMPLING, *cmp.SAMPLED, "tokens_generated") if metrics.get(key) is not None]
    for key in (*cmp.RATES, "reward_mean", "n_examples", *optional):
        if not is_number(metrics[key]):
            raise cli.UsageError(f"{path}: {key} should be a finite number, got {repr(metrics[key])[:60]}; {RERUN}")
    ci = metrics.get("exec_acc_ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci))):
        raise cli.UsageError(f"{path}: exec_acc_ci95 should be [low, high], got {repr(ci)[:60]}; {RERUN}")


def load_policy(path: Path, seed: int, n_resamples: int) -> dict:
    """One summary row (numbers as in metrics.json), with its breakdown and training log."""
    metrics = runs.read_json(path, writer="10_evaluate.py")
    check_metrics(metrics, path)
    name = str(metrics.get("policy_name") or path.parent.name)
    method, name_seed = cmp.parse_policy_name(name)
    evaluation = read_optional(path.parent / "manifest.json", "manifest") or {}
    train_dir = training_folder(metrics, path, method, name)
    train = (read_optional(train_dir / "manifest.json", "training manifest") or {}) if train_dir else {}
    log = read_training_log(train_dir)
    checkpoint = metrics.get("checkpoint")
    configs = [read_optional(Path(checkpoint) / "config.yaml", "config") if checkpoint else None, train.get("config"),
               None if metrics.get("mode") == "predictions" else evaluation.get("config")]
    model = next((c["model"]["name"] for c in configs
                  if isinstance(c, dict) and isinstance(c.get("model"), dict) and c["model"].get("name")), "unknown")
    seeds = (name_seed, train.get("seed"), metrics.get("seed"), evaluation.get("seed"))
    ci = metrics.get("exec_acc_ci95") or [None, None]
    row = {"run": run_of(path) or "unknown", "policy": name, "method": method,
           "seed": next((s for s in seeds if s is not None), None), "model": model,
           **data_facts(metrics.get("data_file")), "n": metrics["n_examples"], "exec_acc": metrics["exec_acc"],
           "exec_acc_ci_low": ci[0], "exec_acc_ci_high": ci[1], **{k: metrics[k] for k in cmp.RATES[1:]},
           "reward_mean": metrics["reward_mean"], **sampled_facts(metrics),
           "eval_tokens": metrics.get("tokens_generated"), **training_facts(train, log),
           "data_sha256": metrics.get("data_sha256"), "path": path, "log": log}
    if method == "base" and row["compute_hours"] is None:
        row["compute_hours"] = 0.0  # the base model is not trained here
    breakdown = read_breakdown(path.parent / "breakdown.csv")
    if breakdown and abs(sum(r["exec_correct"] for r in breakdown.values()) / len(breakdown) - row["exec_acc"]) > 1e-9:
        warn(f"{path.parent}/breakdown.csv disagrees with metrics.json on exec_acc: were they written by one run?")
    rewards = [r["reward"] for r in breakdown.values() if r["reward"] is not None]
    if rewards:  # for the reward bars' error bars only; metrics.json has no reward CI
        row["reward_mean_ci_low"], row["reward_mean_ci_high"] = bootstrap_ci(rewards, seed, n_resamples)
    return {"row": row, "breakdown": breakdown}


# --- comparisons ---

def pick_baseline(policies: list[dict], wanted: str) -> dict | None:
    """The policy named `wanted`, else the lowest-seed policy of that method (warned when ambiguous)."""
    by_name = [p for p in policies if wanted in (p["row"]["label"], p["row"]["policy"])]
    candidates = by_name or [p for p in policies if p["row"]["method"] == wanted]
    if not candidates:
        warn(f"--baseline {wanted!r}: no such policy or method among {[p['row']['label'] for p in policies]}")
        return None
    if len(candidates) > 1:
        warn(f"--baseline {wanted!r} matches several policies: using {candidates[0]['row']['label']}")
    return candidates[0]


def sampled_values(policy: dict, baseline: dict, ids: list) -> tuple[list | None, list | None, str]:
    """What to pair on the shared ids: both sides' per-item sampled_exec_acc and cmp.sampled_label(...) when
    both have it on every id (warned when their sampling settings differ), else (None, None, cmp.GREEDY)."""
    label, base_label = policy["row"]["label"], baseline["row"]["label"]
    sides = [[p["breakdown"][i]["sampled_exec_acc"] for i in ids] for p in (policy, baseline)]
    if None in sides[0] + sides[1]:
        if any(v is not None for v in sides[0] + sides[1]):
            warn(f"{label} vs {base_label}: not both have sampled_exec_acc on every shared item: paired on greedy")
        return None, None, cmp.GREEDY
    settings = [[p["row"][key] for key in cmp.SAMPLING] for p in (policy, baseline)]
    if differ := [f"{key} {a} vs {b}" for key, a, b in zip(cmp.SAMPLING, *settings) if a != b]:
        warn(f"{label} vs {base_label}: sampled with different settings ({', '.join(differ)}): "
             "pairing their sampled means anyway")
    return *sides, cmp.sampled_label(settings[0][0], settings[1][0])


def paired_rows(policies, baseline, seed, n_resamples) -> list[dict]:
    rows = []
    for policy in (p for p in policies if baseline and p is not baseline):
        ids = [i for i in policy["breakdown"] if i in baseline["breakdown"]]
        label, base_label = policy["row"]["label"], baseline["row"]["label"]
        if not ids:
            warn(f"{label}: no item ids shared with {base_label}: no paired test")
            continue
        if len(ids) < max(len(policy["breakdown"]), len(baseline["breakdown"])):
            warn(f"{label} vs {base_label}: only the {len(ids)} shared items are paired")
        rows.append(cmp.paired_row(policy["row"], baseline["row"], ids,
                                   [policy["breakdown"][i]["exec_correct"] for i in ids],
                                   [baseline["breakdown"][i]["exec_correct"] for i in ids], seed, n_resamples,
                                   *sampled_values(policy, baseline, ids)))
    return rows


# --- main ---

def main(args, extra_tokens=()) -> dict:
    return compare(args, config_lib.from_args(args, extra_tokens))


def compare(args, cfg) -> dict:
    seed = cfg["training"]["seed"]  # --seed lands here
    if args.bootstrap < 1:
        raise cli.UsageError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    paths = expand_inputs(args.metrics)
    order = {m: i for i, m in enumerate(cmp.METHODS)}
    policies = sorted((load_policy(path, seed, args.bootstrap) for path in paths),
                      key=lambda p: (order.get(p["row"]["method"], len(order)), p["row"]["method"],
                                     plots.seed_key(p["row"]["seed"]), p["row"]["run"], p["row"]["policy"]))
    names = [p["row"]["policy"] for p in policies]
    for p in policies:  # the same policy name in two runs: tell them apart by run
        p["row"]["label"] = p["row"]["policy"] if names.count(p["row"]["policy"]) == 1 else \
            f"{p['row']['run']}/{p['row']['policy']}"
    roots = {path.resolve().parents[2] if run_of(path) else None for path in paths}
    common = roots.pop() if len(roots) == 1 else None
    folder = (Path(cfg["paths"]["output_dir"]) if cfg["paths"]["output_dir"] else common / MODULE if common
              else runs.module_dir(args.run_id, MODULE, None, cfg["paths"]["output_root"]))
    folder.mkdir(parents=True, exist_ok=True)

    with runs.Manifest(folder, MODULE, vars(args), cfg, seed) as manifest:
        for p in policies:
            manifest.add_input(f"metrics:{p['row']['label']}", p["row"]["path"])
        # --- statistics ---
        summary = [p["row"] for p in policies]
        baseline = pick_baseline(policies, args.baseline)
        baseline_label = baseline["row"]["label"] if baseline else None
        seeds = cmp.seeds_table(summary)
        paired = paired_rows(policies, baseline, seed, args.bootstrap)
        notes = cmp.conclusions(summary, seeds, paired, baseline_label)
        # --- write ---
        for name, rows, columns in (("summary", summary, cmp.SUMMARY_COLUMNS), ("seeds_summary", seeds, list(seeds[0])),
                                    ("paired", paired, cmp.PAIRED_COLUMNS)):
            manifest.add_output(name, runs.atomic_write_text(folder / f"{name}.csv", cmp.to_csv(rows, columns)))
        for name, draw in PLOTS.items():
            manifest.add_output(f"plot:{name}", draw(summary, folder / "plots" / f"{name}.png"))
        inputs = [(str(p["row"]["path"]), manifest.inputs[f"metrics:{p['row']['label']}"]["sha256"]) for p in policies]
        text = cmp.report_markdown(summary, seeds, paired, baseline_label, notes, list(PLOTS),
                                   inputs, args.bootstrap, seed)
        manifest.add_output("report", runs.atomic_write_text(folder / "report.md", text))
        manifest.metrics.update(n_policies=len(summary), baseline=baseline_label, methods=[r["method"] for r in seeds],
                                significant=[r["policy"] for r in paired if r["significant"]],
                                paired_on={r["policy"]: r["paired_on"] for r in paired})

    print("\n".join(f"- {line}" for line in notes))
    print(f"compared {len(summary)} policies; wrote {folder}")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
