"""The pipeline plan of 12_driver.py and its skip rule, as pure functions (tested in tests/test_driver.py).

    stages = plan(Options(methods=("grpo",), seeds=(42,), run_id="run_001", config=DEFAULT_MODEL_CONFIG))
    [s.name for s in stages]   # 00_data_validation, 01_preprocessing, 02_rewards, 03_sft, 06_grpo,
                               # 10_eval_base, 10_eval_sft, 10_eval_grpo, 11_comparison
    run, why = decide(stage, record, manifest, forced=False, sha_of=..., fingerprint_of=...)

A stage is skipped when the driver ran it to completion before (its record in run_manifest.json),
its own manifest.json still says complete and is the one the driver saw, its command line is the
same, every input it recorded (the script's manifest inputs plus the config files) still has the
recorded sha256, and its outputs were not rewritten since. A rerun stage changes its outputs, so
a stage reading them sees a changed input and reruns too; a stage whose inputs come out the same
(01 is deterministic) stays skipped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import UsageError
from utils.comparison import LEARNABILITY_HINT

METHODS = ("ppo", "grpo", "rloo", "dpo")
# method -> (module folder, script); the folder names are DESIGN.md's
# the stages a --launcher runs (several processes train one model); data, candidates, pairs,
# evaluation and comparison run in one process
TRAINING_SCRIPTS = ("03_sft_train.py", "05_train_ppo.py", "06_train_grpo.py", "07_train_rloo.py", "09_train_dpo.py")
METHOD_STAGES = {"ppo": ("05_ppo", "05_train_ppo.py"), "grpo": ("06_grpo", "06_train_grpo.py"),
                 "rloo": ("07_rloo", "07_train_rloo.py"), "dpo": ("09_dpo", "09_train_dpo.py")}
# scripts that train or generate, so take --quick_test
QUICK_TEST_SCRIPTS = {"01_prepare_dataset.py", "03_sft_train.py", "04_generate_candidates.py", "05_train_ppo.py",
                      "06_train_grpo.py", "07_train_rloo.py", "09_train_dpo.py", "10_evaluate.py"}
# trainers whose --resume continues from their newest complete checkpoint
RESUMABLE_SCRIPTS = {"03_sft_train.py", *(script for _, script in METHOD_STAGES.values())}
SYNTHETIC_DATA_DIR = "datasets/synthetic_processed"
# flags the driver sets per stage: a pass-through copy would fight it
RESERVED_OVERRIDES = {"seed": "--seeds", "training.seed": "--seeds", "output_dir": "--run_id and paths.output_root",
                      "paths.output_dir": "--run_id and paths.output_root", "run_id": "--run_id"}


# the stage kinds a recipe's `stages:` section gives flags to
RECIPE_STAGES = ("data", "sft", "candidates", "preferences", *METHODS, "evaluate", "compare")


class PlanError(UsageError):
    """A driver flag is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class Options:
    """What the driver was asked to do (from its command line and the resolved config)."""
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    run_id: str
    config: str
    output_root: str = "outputs"
    data_dir: str = "datasets/finqa_processed"
    dataset: str = "finqa"
    context_mode: str = "retrieved"
    data_root: str = "datasets/finqa"
    algo_config: str | None = None
    overrides: tuple[str, ...] = ()        # --section.key value tokens for every stage
    algo_overrides: tuple[str, ...] = ()   # --algorithm.key value tokens for the method's stages
    quick_test: bool = False
    config_files: tuple[str, ...] = ()     # model config file: an input of every stage
    algo_files: dict = field(default_factory=dict)  # method -> algorithm config file
    levels: tuple[int, ...] = ()           # synthetic: the difficulty ladder's levels (01 --levels)
    num_examples: int | None = None        # synthetic: examples over all splits (01 --num_examples)
    # recipe flags per stage kind (RECIPE_STAGES), before the command line's overrides, which win
    stage_flags: dict = field(default_factory=dict)
    evaluate_base: bool = True             # evaluate the base model too (zero-shot)
    launcher: tuple[str, ...] = ()         # runs the training stages (TRAINING_SCRIPTS), e.g. accelerate launch ...


@dataclass(frozen=True)
class Stage:
    name: str              # unique: log file, --force target, key in run_manifest.json
    script: str
    args: tuple[str, ...]
    folder: str            # the module folder
    manifest: str          # the manifest.json the script writes
    what: str              # one line for the progress display
    deps: tuple[str, ...] = ()     # stages whose outputs it reads
    inputs: tuple[str, ...] = ()   # files the driver knows it reads (config files), hashed besides the manifest's
    seed: int | None = None
    method: str | None = None      # sft, ppo, ... for training stages and evaluations
    launcher: tuple[str, ...] = ()  # the program that runs the script; () = this Python

    @property
    def argv(self) -> list[str]:
        return [self.script, *self.args]

    @property
    def command(self) -> str:
        return shlex.join([*(self.launcher or ("python",)), *self.argv])


# --- command line ---
def expand_methods(method: str) -> tuple[str, ...]:
    if method == "all":
        return METHODS
    if method not in METHODS:
        raise PlanError(f"--method {method!r}: choose one of {', '.join(METHODS)} or all")
    return (method,)


def split_overrides(tokens) -> tuple[list[str], list[str]]:
    """Pass-through tokens -> (overrides for every stage, --algorithm.* overrides for the method's stages).

    Values stay attached to their flag (`--k v` or `--k=v`); utils.config checks keys and types later.
    """
    common, algorithm, tokens, i = [], [], list(tokens), 0
    while i < len(tokens):
        flag = tokens[i]
        if not flag.startswith("--"):
            raise PlanError(f"unexpected argument {flag!r}: pass-through overrides look like --section.key value")
        group = [flag]
        if "=" not in flag and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            group.append(tokens[i + 1])
        i += len(group)
        name = flag[2:].partition("=")[0]
        if name in RESERVED_OVERRIDES:
            raise PlanError(f"{flag}: the driver sets this for each stage; use {RESERVED_OVERRIDES[name]}")
        (algorithm if name.startswith("algorithm.") else common).extend(group)
    return common, algorithm


def override_value(tokens, key: str) -> str | None:
    """The value a token list gives --key (last one wins), or None."""
    value, tokens = None, list(tokens)
    for i, token in enumerate(tokens):
        if token == f"--{key}" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith(f"--{key}="):
            value = token.partition("=")[2]
    return value


# --- plan ---
def _folder(opts: Options, module: str) -> str:
    return str(Path(opts.output_root) / opts.run_id / module)


def _suffix(opts: Options, seed: int) -> str:
    """Seed-specific names: DESIGN.md's for a single seed, `_seed<N>` (as 11_compare_runs parses) for several."""
    return f"_seed{seed}" if len(opts.seeds) > 1 else ""


def recipe_flags(stages: dict, source: str) -> dict[str, tuple[str, ...]]:
    """A recipe's `stages:` section ({kind: {flag: value}}) -> {kind: ("--flag", "value", ...)}; a list
    value gives several tokens (--levels 1 2), true a bare flag."""
    if not isinstance(stages, dict) or (unknown := set(stages) - set(RECIPE_STAGES)):
        raise PlanError(f"{source}: stages must map some of {', '.join(RECIPE_STAGES)} to flags"
                        + (f" (unknown: {', '.join(sorted(map(str, unknown)))})" if isinstance(stages, dict) else ""))
    return {kind: flag_tokens(values, f"{source}: stages.{kind}") for kind, values in stages.items()}


def flag_tokens(values, where: str) -> tuple[str, ...]:
    """{flag: value} -> ("--flag", "value", ...); a list gives several tokens, true a bare flag, false none."""
    if not isinstance(values, dict):
        raise PlanError(f"{where} must map flags to values, e.g. training.max_steps: 40")
    tokens = []
    for key, value in values.items():
        if value is False or value is None:
            continue
        tokens.append(f"--{key}")
        if value is not True:
            tokens += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return tuple(tokens)


def _stage(opts: Options, name, script, folder, what, args=(), *, manifest=None, seed=None, deps=(),
           method=None, algo=None, kind=None) -> Stage:
    """One stage with the flags every stage gets: config, run id, seed, quick test, the recipe's flags for
    its kind, overrides (last: they win)."""
    argv = [*args, "--config", opts.config, "--run_id", opts.run_id]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if opts.quick_test and script in QUICK_TEST_SCRIPTS:
        argv.append("--quick_test")
    inputs = list(opts.config_files)
    if algo:
        if opts.algo_config:
            argv += ["--algo_config", opts.algo_config]
        inputs += [opts.algo_files[algo]] if algo in opts.algo_files else []
    argv += [*opts.stage_flags.get(kind, ()), *opts.overrides, *(opts.algo_overrides if algo else ())]
    return Stage(name, script, tuple(argv), folder, manifest or str(Path(folder) / "manifest.json"), what,
                 tuple(deps), tuple(inputs), seed, method, opts.launcher if script in TRAINING_SCRIPTS else ())


def plan(opts: Options) -> list[Stage]:
    """Every stage, in run order: data, rewards, then per seed SFT (+ candidates and pairs for DPO) and
    the methods, then the evaluations (base, SFT and each method) and the comparison."""
    if not opts.methods or not opts.seeds:
        raise PlanError("at least one method and one seed are needed")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise PlanError(f"--seeds {' '.join(map(str, opts.seeds))}: each seed once")
    if (opts.algo_config or opts.algo_overrides) and len(opts.methods) != 1:
        raise PlanError("--algo_config and --algorithm.* overrides hold one method's hyperparameters: "
                        "use them with a single --method")
    stages = []
    if opts.dataset == "finqa":  # 00 checks the raw FinQA files; synthetic data has none
        stages.append(_stage(opts, "00_data_validation", "00_check_data.py", _folder(opts, "00_data_validation"),
                             "check the raw FinQA files (schema, gold programs, lengths)",
                             ["--data_root", opts.data_root]))
    data_args = ["--dataset", opts.dataset, "--context_mode", opts.context_mode, "--output_dir", opts.data_dir]
    if opts.dataset == "finqa":
        data_args[:0] = ["--data_root", opts.data_root]
    else:
        data_args += ["--levels", *map(str, opts.levels)] if opts.levels else []
        data_args += ["--num_examples", str(opts.num_examples)] if opts.num_examples else []
    stages.append(_stage(opts, "01_preprocessing", "01_prepare_dataset.py", _folder(opts, "01_preprocessing"),
                         f"{opts.dataset} -> {opts.data_dir}/{{train,val,test}}.jsonl ({opts.context_mode} context)",
                         data_args, kind="data"))
    rewards = _folder(opts, "02_rewards")
    spec = str(Path(rewards) / "reward_spec.yaml")
    stages.append(_stage(opts, "02_rewards", "02_build_rewards.py", rewards,
                         "write reward_spec.yaml and check the reward on its edge cases"))
    trained = []  # (stage name, folder, policy name, method, seed)
    for seed in opts.seeds:
        sfx = _suffix(opts, seed)
        sft = _folder(opts, f"03_sft{sfx}")
        stages.append(_stage(opts, f"03_sft{sfx}", "03_sft_train.py", sft, f"SFT with LoRA (seed {seed})",
                             ["--output_dir", sft, "--reward_spec", spec], seed=seed,
                             deps=["01_preprocessing", "02_rewards"], method="sft", kind="sft"))
        trained.append((f"03_sft{sfx}", sft, f"sft{sfx}", "sft", seed))
        pairs = None
        if "dpo" in opts.methods:
            candidates, prefs = _folder(opts, f"04_candidates{sfx}"), _folder(opts, f"08_preferences{sfx}")
            stages.append(_stage(opts, f"04_candidates{sfx}", "04_generate_candidates.py", candidates,
                                 f"sample and score candidates from the SFT policy (seed {seed})",
                                 ["--policy_ckpt", sft, "--output_dir", candidates, "--reward_spec", spec],
                                 seed=seed, deps=[f"03_sft{sfx}", "02_rewards"], kind="candidates"))
            stages.append(_stage(opts, f"08_preferences{sfx}", "08_build_prefs.py", prefs,
                                 f"pair the candidates into DPO preferences (seed {seed})",
                                 ["--candidates_dir", candidates, "--output_dir", prefs],
                                 seed=seed, deps=[f"04_candidates{sfx}"], algo="dpo", kind="preferences"))
            pairs = str(Path(prefs) / "pairs.jsonl")
        for method in opts.methods:
            module, script = METHOD_STAGES[method]
            folder = _folder(opts, f"{module}{sfx}")
            if method == "dpo":
                args = ["--base_or_sft_ckpt", sft, "--pairs", pairs, "--output_dir", folder, "--reward_spec", spec]
                deps = [f"03_sft{sfx}", f"08_preferences{sfx}"]
            else:
                args = ["--policy_ckpt", sft, "--output_dir", folder, "--reward_spec", spec]
                deps = [f"03_sft{sfx}", "02_rewards"]
            stages.append(_stage(opts, f"{module}{sfx}", script, folder,
                                 f"{method.upper()} from the SFT checkpoint (seed {seed})", args, seed=seed,
                                 deps=deps, method=method, algo=method, kind=method))
            trained.append((f"{module}{sfx}", folder, f"{method}{sfx}", method, seed))
    # --- evaluation ---
    evaluations = []
    base = [(None, None, "base", "base", None)] if opts.evaluate_base else []
    for dep, checkpoint, policy, method, seed in [*base, *trained]:
        folder = _folder(opts, f"10_evaluation/{policy}")
        args = ["--policy_name", policy, "--split", "test", "--output_dir", folder, "--reward_spec", spec]
        if checkpoint:
            args[:0] = ["--policy_ckpt", checkpoint]
        what = f"evaluate {'the base model' if checkpoint is None else checkpoint} on test"
        stages.append(_stage(opts, f"10_eval_{policy}", "10_evaluate.py", folder, what, args, seed=seed,
                             deps=["01_preprocessing", "02_rewards", *([dep] if dep else [])], method=method,
                             kind="evaluate"))
        evaluations.append(stages[-1])
    comparison = _folder(opts, "11_comparison")
    stages.append(_stage(opts, "11_comparison", "11_compare_runs.py", comparison,
                         "summary table, paired tests, plots and report.md",
                         [*(str(Path(s.folder) / "metrics.json") for s in evaluations), "--output_dir", comparison],
                         deps=[s.name for s in evaluations], kind="compare"))
    return stages


def select_forced(stages: list[Stage], targets) -> set[str]:
    """--force targets -> stage names. A target is a stage name, a stage name without its seed suffix
    (03_sft: every seed's SFT) or a script number (10: every evaluation)."""
    chosen = set()
    for target in targets:
        hits = {s.name for s in stages if target in (s.name, s.name.rsplit("_seed", 1)[0], s.script[:2])}
        if not hits:
            raise PlanError(f"--force {target}: no such stage; stages: {', '.join(s.name for s in stages)} "
                            f"(or a script number such as 10)")
        chosen |= hits
    return chosen


# --- skip rule ---
def decide(stage: Stage, record: dict | None, manifest: dict | None, forced: bool, sha_of, fingerprint_of
           ) -> tuple[bool, str]:
    """(run?, why). record: the stage's entry in run_manifest.json; manifest: its manifest.json (None if absent);
    sha_of(path) -> sha256 or None; fingerprint_of(paths) -> a fingerprint of the files there."""
    if forced:
        return True, "forced (--force)"
    if not record or record.get("status") != "complete":
        return True, "not run yet" if not record else f"its last attempt did not complete ({record.get('status')})"
    if manifest is None:
        return True, f"{stage.manifest} is missing"
    if manifest.get("status") != "complete":
        return True, f"{stage.manifest} says {manifest.get('status')}"
    if manifest.get("finished_at") != record.get("finished_at"):
        return True, f"{stage.manifest} was rewritten since the driver ran it (a run by hand?)"
    if record.get("argv") != stage.argv:
        return True, "its command line changed"
    for path, digest in (record.get("inputs") or {}).items():
        if sha_of(path) != digest:
            return True, f"input {path} changed"
    if fingerprint_of(record.get("outputs") or []) != record.get("outputs_fingerprint"):
        return True, "its outputs were rewritten or removed since"
    return False, "complete; command, inputs and outputs unchanged"


def resume_args(stage: Stage, record: dict | None, sha_of) -> tuple[str, ...]:
    """("--resume", "auto") for a trainer whose last attempt was cut short (killed: its record still says
    running; or Ctrl-C: interrupted) under the same command line and inputs: it continues from its newest
    complete checkpoint, if it wrote one, instead of losing the steps it had done. A failed attempt, or a
    changed command or input, starts afresh. record: the stage's entry in run_manifest.json."""
    if stage.script not in RESUMABLE_SCRIPTS or not record or record.get("status") not in ("running", "interrupted"):
        return ()
    if record.get("argv") != stage.argv or any(sha_of(p) != d for p, d in (record.get("inputs") or {}).items()):
        return ()
    return ("--resume", "auto")


def stage_record(stage: Stage, manifest: dict, duration_s: float, sha_of, fingerprint_of, log: str,
                 cpu_s: float | None = None) -> dict:
    """run_manifest.json's entry for a stage that just completed: what decide() compares next time."""
    inputs = {info["path"]: info["sha256"] for info in (manifest.get("inputs") or {}).values()}
    inputs.update({path: sha_of(path) for path in stage.inputs})
    outputs = sorted(str(p) for p in (manifest.get("outputs") or {}).values())
    return {"status": "complete", "script": stage.script, "argv": stage.argv, "command": stage.command,
            "manifest": stage.manifest, "log": log, "duration_s": round(duration_s, 1),
            "cpu_s": round(cpu_s, 1) if cpu_s is not None else None,
            "finished_at": manifest.get("finished_at"), "inputs": inputs, "outputs": outputs,
            "outputs_fingerprint": fingerprint_of(outputs)}


def stat_fingerprint(paths) -> str:
    """sha256 over (path, size, mtime) of every file under paths: cheap, and changes when a file is rewritten."""
    digest = hashlib.sha256()
    for path in map(Path, sorted(map(str, paths))):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            digest.update(f"{file}\0{stat.st_size if stat else -1}\0{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()


# --- README ---
README_COLUMNS = ["policy", "method", "seed", "n", "exec_acc", "exec_acc_ci_low", "exec_acc_ci_high", "prog_acc",
                  "format_rate", "reward_mean"]


def summary_table(csv_text: str) -> str:
    """A markdown table of 11's summary.csv (the columns a reader needs first; summary.csv has them all)."""
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    if not rows:
        return "(summary.csv has no rows)"
    columns = [c for c in README_COLUMNS if c in rows[0]]

    def cell(value: str) -> str:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value or ""
        return value if number.is_integer() and "." not in value else f"{number:.3f}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def readme_text(info: dict, stages: list[Stage], summary_csv: str | None) -> str:
    """outputs/<run>/README.md: goal, configuration, the commands run and the results summary."""
    methods = ", ".join(m.upper() for m in info["methods"])
    quick = ("yes: a smoke run on small subsets with a few steps; its numbers say the pipeline works, "
             f"not how the methods compare: {LEARNABILITY_HINT}" if info["quick_test"] else "no")
    lines = [
        f"# Run {info['run_id']}", "",
        f"Goal: compare {methods} fine-tuning of {info['model']} on {info['dataset']} program generation, every "
        f"method from the same SFT checkpoint with the same data, prompts, reward spec and evaluation, against the "
        f"base model and the SFT start.", "",
        "## Configuration", "",
        "| | |", "|---|---|",
        f"| model | {info['model']} (`{info['model_path']}`, config `{info['config']}`) |",
        f"| methods | {methods} |",
        f"| algorithm config | {info.get('algo_config') or 'configs/algorithms/<method>.yaml'} |",
        f"| seeds | {', '.join(map(str, info['seeds']))} |",
        f"| dataset | {info['dataset']} (`{info['data_dir']}`) |",
        f"| context mode | {info['context_mode']}{' (an ORACLE: gold facts)' if info['context_mode'] == 'gold' else ''} |",
        f"| quick_test | {quick} |",
        f"| overrides | {' '.join(info.get('overrides') or []) or 'none'} |",
        f"| git commit | {info.get('git_commit') or 'unknown'} |", "",
        "## Commands", "",
        f"Driver: `{info['command']}` (rerun it to resume: completed stages are skipped). Each stage, in order "
        f"(logs in `logs/<stage>.log`, manifests listed in `run_manifest.json`):", "",
        "```", *(s.command for s in stages), "```", "",
        "## Results", "",
    ]
    if summary_csv is None:
        lines.append("Not available yet: the comparison (11_comparison) has not completed.")
    else:
        lines += ["Test split, greedy decoding; accuracies are fractions with 95% bootstrap intervals "
                  "(11_comparison/summary.csv has every column).", "", summary_table(summary_csv), "",
                  "Full report with paired tests, plots and conclusions: "
                  "[11_comparison/report.md](11_comparison/report.md)."]
    return "\n".join(lines) + "\n"
