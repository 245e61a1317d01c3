"""Run the pipeline end to end: data -> rewards -> SFT -> PPO/GRPO/RLOO/DPO -> evaluation -> comparison.

    python 12_driver.py --method all --quick_test                    # smoke run of everything (CPU: minutes)
    python 12_driver.py --method all --run_id run_002                # the real run
    python 12_driver.py --method grpo --seeds 1 2 3 --run_id grpo_seeds
    python 12_driver.py --method dpo --algo_config configs/algorithms/dpo.yaml --algorithm.beta 0.2
    python 12_driver.py --method all --dataset synthetic --quick_test --dry_run   # print the plan only
    python 12_driver.py --method all --quick_test --force 03_sft     # retrain SFT; what reads it reruns
    python 12_driver.py --recipe ladder_cpu                          # every method on accuracy, CPU-sized
    python 12_driver.py --method grpo --launcher "accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml"

Stages: 00 check data, 01 prepare, 02 rewards, then per seed 03 SFT (shared by the seed's methods),
04 candidates and 08 preferences (DPO only), the methods (05 PPO, 06 GRPO, 07 RLOO, 09 DPO), then 10 evaluates
base, SFT and each method on test, and 11 compares them. Each stage is a subprocess whose output is shown and
saved to outputs/<run>/logs/<stage>.log. A stage that completed before with the same command line, inputs
(sha256) and untouched outputs is skipped, so rerunning the same command after an interruption resumes where it
stopped (utils/driver.py has the rule); a trainer that was killed or interrupted continues from its newest
complete checkpoint (--resume auto). With several seeds, seed-specific folders and policy names get a _seed<N>
suffix (03_sft_seed1, grpo_seed1). Unknown --section.key value flags are passed to every stage; --algorithm.*
ones to the method's stages. Writes outputs/<run>/run_manifest.json (every stage's command, inputs, manifest,
status and time) and outputs/<run>/README.md (configuration, commands, results table).

--launcher runs the training stages (03, 05, 06, 07, 09) through a launcher, so one driver command trains on
several GPUs (one writer per run: only the main process writes); the other stages run in one process.

--recipe NAME reads configs/recipes/NAME.yaml (or a path): its `driver:` section sets this script's flags
(the command line wins), `overrides:` are --section.key values for every stage (the command line's win) and
`stages:` gives flags to each kind of stage (data, sft, candidates, preferences, ppo, grpo, rloo, dpo,
evaluate, compare), placed before the overrides.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from utils import config as config_lib
from utils import cli, driver, runs

REPO_ROOT = Path(__file__).resolve().parent
RECIPES_DIR = REPO_ROOT / "configs" / "recipes"
TAIL_LINES = 25  # log lines shown when a stage fails


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --seed must not pass for --seeds
    parser.add_argument("--method", default="all", help="ppo, grpo, rloo, dpo or all (default: %(default)s)")
    parser.add_argument("--run_id", default="run_001", help="outputs/<run_id>/ (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed (default: 42)")
    parser.add_argument("--config", default=config_lib.DEFAULT_MODEL_CONFIG,
                        help="model config, a path or a name in configs/models/ (default: %(default)s)")
    parser.add_argument("--algo_config", default=None,
                        help="algorithm config for a single --method (default: configs/algorithms/<method>.yaml)")
    parser.add_argument("--dataset", choices=["finqa", "synthetic"], default="finqa")
    parser.add_argument("--context_mode", choices=["retrieved", "gold", "full"], default="retrieved")
    parser.add_argument("--data_root", default="datasets/finqa", help="raw FinQA folder (default: %(default)s)")
    parser.add_argument("--quick_test", action="store_true", help="small subsets and a few steps in every stage")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun this stage even if complete (repeatable): a stage name (03_sft_seed1), "
                             "a name without its seed (03_sft) or a script number (10)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and what would be skipped")
    parser.add_argument("--levels", type=int, nargs="+", default=None,
                        help="synthetic: difficulty levels of the ladder, gold program steps (01 --levels)")
    parser.add_argument("--num_examples", type=int, default=None,
                        help="synthetic: examples over all splits (default: 01's)")
    parser.add_argument("--skip_base_eval", action="store_true", help="do not evaluate the base model (zero-shot)")
    parser.add_argument("--launcher", default=None,
                        help="run the training stages (03, 05, 06, 07, 09) through this command, e.g. \"accelerate "
                             "launch --config_file configs/accelerate/multi_gpu_ddp.yaml\" (one process per GPU); "
                             "the other stages run in one process (default: python)")
    parser.add_argument("--recipe", default=None,
                        help="a recipe: a name in configs/recipes/ (ladder_cpu) or a YAML path; sets driver flags "
                             "and per-stage flags (see above)")
    args, extra = parser.parse_known_args(argv)
    args.stage_flags = {}
    if args.recipe:
        recipe, source = load_recipe(args.recipe)
        driver_keys = recipe.get("driver") or {}
        known = {action.dest for action in parser._actions} - {"help", "recipe"}
        if not isinstance(driver_keys, dict) or (unknown := set(driver_keys) - known):
            raise cli.UsageError(f"{source}: driver: must map 12_driver.py flags ({', '.join(sorted(known))}) to "
                                 f"values" + (f"; unknown: {', '.join(sorted(map(str, unknown)))}"
                                              if isinstance(driver_keys, dict) else ""))
        parser.set_defaults(**driver_keys)  # what the command line gives still wins
        args, extra = parser.parse_known_args(argv)
        args.stage_flags = driver.recipe_flags(recipe.get("stages") or {}, source)
        # the recipe's overrides for every stage come first: the command line's, later, win
        extra = [*driver.flag_tokens(recipe.get("overrides") or {}, f"{source}: overrides"), *extra]
    return args, extra


def load_recipe(name: str) -> tuple[dict, str]:
    """A recipe YAML by name (configs/recipes/<name>.yaml) or path, and the path to name in errors."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise cli.UsageError(f"--recipe {name}: {path} not found; recipes: {choices}")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise cli.UsageError(f"--recipe {name}: {path} is not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(recipe, dict):
        raise cli.UsageError(f"--recipe {name}: {path} must hold a mapping with driver: and stages: sections")
    return recipe, str(path)


# --- helpers ---
class Hashes:
    """sha256 of files and folders, each computed once per (path, sizes, mtimes): a model is hashed once."""

    def __init__(self):
        self.cache: dict[str, tuple[str, str]] = {}

    def sha_of(self, path) -> str | None:
        if not Path(path).exists():
            return None
        key = driver.stat_fingerprint([path])
        if self.cache.get(str(path), ("",))[0] != key:
            self.cache[str(path)] = (key, runs.sha256_path(path))
        return self.cache[str(path)][1]


def read_manifest(path) -> dict | None:
    try:
        return runs.read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def cpu_seconds() -> float:
    """CPU time (user + system) of the finished subprocesses so far: with the wall time, it shows how much
    other processes on the machine slowed a stage down."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: driver.Stage, log_path: Path, extra=()) -> int:
    """Run the stage's script (+ extra flags), its output teed to the console and the log (raw bytes:
    progress bars survive)."""
    cmd = [*(stage.launcher or (sys.executable,)), str(REPO_ROOT / stage.script), *stage.args, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # unbuffered: `tail -f` the log while a stage runs; a resumed stage's log keeps the cut-short attempt
    with open(log_path, "ab" if extra else "wb", buffering=0) as log:
        log.write(f"$ {' '.join([stage.command, *extra])}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it write its failed manifest
            proc.wait(timeout=60)
            raise
        return proc.wait()


def tail(path: Path, n: int = TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join("    " + line.rsplit("\r", 1)[-1] for line in text.splitlines()[-n:])


def resolve(args, extra) -> tuple[driver.Options, dict]:
    """Options for the plan, checking every override against the config schema before anything runs."""
    runs.validate_run_id(args.run_id)
    methods = driver.expand_methods(args.method)
    common, algorithm = driver.split_overrides(extra)
    data_dir = driver.override_value(common, "paths.data_dir")
    if data_dir is None and args.dataset == "synthetic":
        data_dir = driver.SYNTHETIC_DATA_DIR
        common += ["--paths.data_dir", data_dir]
    cfg = config_lib.load(args.config, None, common)
    algo_files = {}
    for method in methods:
        algo = args.algo_config or method
        config_lib.load(args.config, algo, [*common, *algorithm])
        algo_files[method] = str(config_lib.resolve_config_path(algo, config_lib.ALGORITHMS_DIR))
    if "dpo" in methods and "dpo" not in algo_files:
        algo_files["dpo"] = str(config_lib.resolve_config_path("dpo", config_lib.ALGORITHMS_DIR))
    opts = driver.Options(
        methods=methods, seeds=tuple(args.seeds), run_id=args.run_id, config=args.config,
        output_root=cfg["paths"]["output_root"], data_dir=data_dir or cfg["paths"]["data_dir"],
        dataset=args.dataset, context_mode=args.context_mode, data_root=args.data_root,
        algo_config=args.algo_config, overrides=tuple(common), algo_overrides=tuple(algorithm),
        quick_test=args.quick_test,
        config_files=(str(config_lib.resolve_config_path(args.config, config_lib.MODELS_DIR)),),
        algo_files=algo_files, levels=tuple(args.levels or ()), num_examples=args.num_examples,
        stage_flags=args.stage_flags, evaluate_base=not args.skip_base_eval,
        launcher=tuple(shlex.split(args.launcher)) if args.launcher else ())
    return opts, cfg


# --- main ---
def main(args, extra=()) -> dict:
    """Runs (or with --dry_run prints) the plan; returns the run's record (run_manifest.json)."""
    opts, cfg = resolve(args, extra)
    stages = driver.plan(opts)
    forced = driver.select_forced(stages, args.force)
    missing = [s.script for s in stages if not (REPO_ROOT / s.script).is_file()]
    if missing and not args.dry_run:
        raise cli.UsageError(f"missing scripts: {', '.join(dict.fromkeys(missing))}")
    if missing:
        print(f"warning: missing scripts: {', '.join(dict.fromkeys(missing))}", file=sys.stderr)
    run_dir = Path(opts.output_root) / opts.run_id
    manifest_path, logs = run_dir / "run_manifest.json", run_dir / "logs"
    state = read_manifest(manifest_path) or {}
    records, hashes, n = state.get("stages", {}), Hashes(), len(stages)
    command = shlex.join(["python", "12_driver.py", *sys.argv[1:]])
    print(f"run {opts.run_id}: {n} stages, methods {', '.join(opts.methods)}, seeds "
          f"{' '.join(map(str, opts.seeds))}, {opts.dataset} ({opts.context_mode})"
          f"{', quick test' if opts.quick_test else ''} -> {run_dir}", flush=True)

    if args.dry_run:
        will_run = set()
        for i, stage in enumerate(stages, 1):
            run, why = driver.decide(stage, records.get(stage.name), read_manifest(stage.manifest),
                                     stage.name in forced, hashes.sha_of, driver.stat_fingerprint)
            upstream = [d for d in stage.deps if d in will_run]
            if not run and upstream:
                run, why = True, f"if its inputs change when {', '.join(upstream)} reruns"
            will_run |= {stage.name} if run else set()
            print(f"[{i:2d}/{n}] {stage.name}: {'run' if run else 'skip'} ({why})\n        {stage.command}")
        return state

    runs.lock_folder(run_dir)  # one driver per run: a second one would train into the same folders
    logs.mkdir(parents=True, exist_ok=True)
    started, t0 = runs.timestamp(), time.monotonic()
    info = {"run_id": opts.run_id, "command": command, "methods": list(opts.methods), "seeds": list(opts.seeds),
            "dataset": opts.dataset, "data_dir": opts.data_dir, "context_mode": opts.context_mode,
            "quick_test": opts.quick_test, "config": opts.config, "algo_config": opts.algo_config,
            "overrides": [*opts.overrides, *opts.algo_overrides], "model": cfg["model"]["name"],
            "model_path": cfg["model"]["name_or_path"]}
    invocation = {"command": command, "started_at": started, "ran": [], "skipped": []}
    state.update(info, status="running", started_at=started, git=runs.git_info(), plan=[s.name for s in stages],
                 stages={**records, **{s.name: records.get(s.name, {"status": "pending", "manifest": s.manifest})
                                       for s in stages}})
    state.setdefault("invocations", []).append(invocation)
    info["git_commit"] = state["git"]["commit"]

    def save(status: str) -> None:
        state.update(status=status, finished_at=runs.timestamp(), duration_s=round(time.monotonic() - t0, 1))
        invocation.update(status=status, finished_at=state["finished_at"])
        runs.atomic_write_json(manifest_path, state)
        summary = run_dir / "11_comparison" / "summary.csv"
        done = state["stages"].get("11_comparison", {}).get("status") == "complete" and summary.is_file()
        runs.atomic_write_text(run_dir / "README.md", driver.readme_text(
            info, stages, summary.read_text(encoding="utf-8") if done else None))

    save("running")
    for i, stage in enumerate(stages, 1):
        head = f"[{i:2d}/{n}] {stage.name}"
        run, why = driver.decide(stage, records.get(stage.name), read_manifest(stage.manifest),
                                 stage.name in forced, hashes.sha_of, driver.stat_fingerprint)
        if not run:
            print(f"{head}: skipped ({why})", flush=True)
            invocation["skipped"].append(stage.name)
            continue
        log = logs / f"{stage.name}.log"
        resume = () if stage.name in forced else driver.resume_args(stage, records.get(stage.name), hashes.sha_of)
        print(f"\n{'=' * 100}\n{head}: {stage.what} [runs because {why}{'; resumes' if resume else ''}]\n"
              f"  $ {' '.join([stage.command, *resume])}\n  log: {log}\n{'=' * 100}", flush=True)
        state["stages"][stage.name] = {"status": "running", "script": stage.script, "argv": stage.argv,
                                       "command": stage.command, "manifest": stage.manifest, "log": str(log),
                                       "inputs": {path: hashes.sha_of(path) for path in stage.inputs}}
        save("running")
        t_stage, cpu_start = time.monotonic(), cpu_seconds()
        try:
            code = run_stage(stage, log, resume)
        except KeyboardInterrupt:
            state["stages"][stage.name]["status"] = "interrupted"
            save("interrupted")
            print(f"\ninterrupted in {stage.name}; rerun the same command to resume", file=sys.stderr)
            raise
        seconds = time.monotonic() - t_stage
        manifest = read_manifest(stage.manifest)
        if code != 0 or not manifest or manifest.get("status") != "complete":
            problem = (f"exited with status {code}" if code != 0 else
                       f"exited 0 but {stage.manifest} says {manifest.get('status') if manifest else 'nothing (missing)'}")
            state["stages"][stage.name].update(status="failed", exit_code=code, duration_s=round(seconds, 1))
            save("failed")
            print(f"\nFAILED: stage {stage.name} ({stage.script}) {problem} after {clock(seconds)}.\n"
                  f"log: {log}\nlast lines:\n{tail(log)}", flush=True)
            raise cli.JobFailed(f"stage {stage.name} {problem}; log: {log}. Fix the cause and rerun the same "
                                f"command: completed stages are skipped")
        record = driver.stage_record(stage, manifest, seconds, hashes.sha_of, driver.stat_fingerprint, str(log),
                                     cpu_s=cpu_seconds() - cpu_start)
        state["stages"][stage.name] = records[stage.name] = record
        invocation["ran"].append(stage.name)
        save("running")
        print(f"{head}: done in {clock(seconds)} (pipeline {clock(time.monotonic() - t0)})", flush=True)

    save("complete")
    print(f"\nrun {opts.run_id} complete in {clock(time.monotonic() - t0)}: {len(invocation['ran'])} stages ran, "
          f"{len(invocation['skipped'])} skipped.\n  {run_dir / 'README.md'}\n  {run_dir / '11_comparison' / 'report.md'}")
    return state


if __name__ == "__main__":
    cli.run(main, parse_args)
