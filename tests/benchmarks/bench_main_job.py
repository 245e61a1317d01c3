"""Time the README's main job, `python 12_driver.py --method all --quick_test` (target: <= 20 min on 2 CPU cores).

    python tests/benchmarks/bench_main_job.py                      # a fresh run id, bench_<time>
    python tests/benchmarks/bench_main_job.py --literal            # exactly the README command's data folder
    python tests/benchmarks/bench_main_job.py --run_id bench_1 -- --context_mode gold   # extra driver flags
    python tests/benchmarks/bench_main_job.py --report bench_1     # the table of an earlier run only

Runs the driver in a fresh --run_id (so nothing is skipped) and prints the total wall time and each
stage's wall and CPU time (from outputs/<run>/run_manifest.json: subprocess start to exit, imports
included; CPU = user + system of the stage's processes).
By default the processed data goes to outputs/<run>/data (--paths.data_dir) instead of
datasets/finqa_processed, which a quick test would overwrite with 20-example subsets while other work
on the same tree may read it; the stages and their cost are the same. Needs the default model
(setup.sh) and datasets/finqa (download.sh). The CPU load of other processes skews every figure: the
load average before and after is printed with them.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 20 * 60  # the README's promise for the main job on 2 CPU cores


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", default=None, help="default: bench_<YYYYmmdd_HHMMSS>")
    parser.add_argument("--literal", action="store_true",
                        help="run the README command as is (processed data in datasets/finqa_processed)")
    parser.add_argument("--report", metavar="RUN_ID", help="only print the table of an earlier run")
    parser.add_argument("driver_args", nargs="*", help="extra 12_driver.py flags, after --")
    return parser.parse_args()


def report(run_dir: Path, wall: float | None = None) -> None:
    """Per-stage wall and CPU seconds from run_manifest.json, their sums, and the budget verdict."""
    state = json.loads((run_dir / "run_manifest.json").read_text())
    records = [state["stages"].get(name, {}) for name in state["plan"]]
    print(f"\n{'stage':<22} {'status':<10} {'wall s':>8} {'cpu s':>8}")
    for name, record in zip(state["plan"], records):
        cells = [record.get(key) for key in ("duration_s", "cpu_s")]
        print(f"{name:<22} {record.get('status', '-'):<10} " + " ".join(f"{c if c is not None else '-':>8}" for c in cells))
    wall_sum, cpu_sum = (sum(r.get(key) or 0 for r in records) for key in ("duration_s", "cpu_s"))
    wall = wall if wall is not None else state.get("duration_s") or wall_sum
    cores = os.cpu_count()
    print(f"{'sum of stages':<33} {wall_sum:>8.1f} {cpu_sum:>8.1f}")
    print(f"{'total (driver wall)':<33} {wall:>8.1f}  = {wall / 60:.1f} min, status {state.get('status')}")
    # an idle machine gives wall >= cpu / cores (single-threaded parts add to it); far above it, others took a share
    print(f"budget {BUDGET_S / 60:.0f} min: {'within' if wall <= BUDGET_S else 'OVER'}; cpu s / {cores} cores = "
          f"{cpu_sum / cores / 60:.1f} min, the floor of the wall time on an idle machine")


def main(args) -> int:
    if args.report:
        report(ROOT / "outputs" / args.report)
        return 0
    run_id = args.run_id or time.strftime("bench_%Y%m%d_%H%M%S")
    run_dir = ROOT / "outputs" / run_id
    if (run_dir / "run_manifest.json").exists():
        sys.exit(f"{run_dir} already holds a run: pick a fresh --run_id, so no stage is skipped")
    command = [sys.executable, "12_driver.py", "--method", "all", "--quick_test", "--run_id", run_id,
               *([] if args.literal else ["--paths.data_dir", f"outputs/{run_id}/data"]), *args.driver_args]
    load_before = os.getloadavg()
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT)
    wall = time.monotonic() - start
    if (run_dir / "run_manifest.json").exists():
        report(run_dir, wall)
    print(f"load average {load_before[0]:.1f} before the run, {os.getloadavg()[0]:.1f} after "
          f"(above 0 before: other processes share the CPU)\ncommand: {' '.join(command[1:])}\nrun: {run_dir}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(parse_args()))
