"""What the pipeline benchmarks share: run a numbered script as one stage, and score a checkpoint with it.

    from tests.benchmarks.stages import ROOT, evaluate, run_stage
    seconds = run_stage("03_sft", ["03_sft_train.py", "--run_id", "r1", "--max_steps", "40"], run_dir)
    metrics = evaluate("sft_start", sft_ckpt, run_dir, common, run_dir / "data" / "val.jsonl", 200, num_samples=4)

Each stage is a subprocess (`python <script> ...`, cwd the repository root), so a benchmark measures
exactly what a user's command does, imports and model loading included. Its stdout and stderr go to
run_dir/logs/<name>.log; the benchmark prints the command and the wall time, and stops (naming the
log) at the first stage that fails. `common` is the flag list every stage of a run shares (--config,
--run_id, --seed, --paths.output_root, ...): run_dir must be <paths.output_root>/<run_id>, where the
scripts write.
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_stage(name: str, argv: list, run_dir: Path) -> float:
    """Run one numbered script, its output to run_dir/logs/<name>.log; returns its wall seconds.
    Exits the benchmark (a message naming the log) if the script fails."""
    argv = [str(part) for part in argv]
    log = run_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name:<16} python {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}) after {elapsed:.0f}s: see {log}")
    print(f"{'':<16} done in {elapsed:.0f}s", flush=True)
    return elapsed


def evaluate(name: str, ckpt: Path, run_dir: Path, common: list, val_jsonl: Path, max_examples: int,
             num_samples: int = 0, temperature: float | None = None, top_p: float | None = None,
             extra=()) -> dict:
    """10_evaluate.py on a checkpoint, as policy `name`: greedy on the first max_examples examples of
    val_jsonl, plus num_samples sampled completions per prompt when > 0 (temperature, top_p: None
    keeps the config's generation values). `extra`: more 10_evaluate flags (e.g. batch size).
    Returns its metrics.json (exec_acc, exec_acc_ci95, ..., sampled_* with num_samples) and eval_s."""
    argv = ["10_evaluate.py", *common, "--policy_ckpt", ckpt, "--policy_name", name, "--test_jsonl", val_jsonl,
            "--max_examples", max_examples]
    if num_samples > 0:
        argv += ["--num_samples", num_samples]
        argv += ["--temperature", temperature] if temperature is not None else []
        argv += ["--top_p", top_p] if top_p is not None else []
    elapsed = run_stage(f"10_{name}", [*argv, *extra], run_dir)
    metrics = json.loads((run_dir / "10_evaluation" / name / "metrics.json").read_text())
    return metrics | {"eval_s": round(elapsed, 1)}
