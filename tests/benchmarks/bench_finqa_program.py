"""Throughput of the FinQA program executor on one core (target: >= 50,000 executions/s).

    python tests/benchmarks/bench_finqa_program.py [--seconds 3]

Runs the gold programs of the FinQA sample (or a built-in mix when the sample is absent)
against their tables, and prints executions per second for execute() and for program
equivalence, which calls sympy and is cached per expression.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from utils.finqa_program import equivalent, execute  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "finqa-sample"
FALLBACK = [("subtract(5829, 5735), divide(#0, 5735)", []),
            ("table_average(revenue, none)", [["revenue", "$ 1,000", "2,000"]]),
            ("greater(5, 3)", []), ("add(1, 2), multiply(#0, const_100)", [])]


def workload():
    if not SAMPLE.is_dir():
        return FALLBACK
    items = []
    for split in ("train", "dev", "test"):
        items += [(e["qa"]["program"], e["table"]) for e in json.loads((SAMPLE / f"{split}.json").read_text())]
    return items


def rate(fn, items, seconds):
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for program, table in items:
            fn(program, table)
        calls += len(items)
    return calls / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    items = workload()
    execute_rate = rate(execute, items, args.seconds)
    equivalent_rate = rate(lambda p, _t: equivalent(p, p), items, args.seconds)
    print(f"programs: {len(items)} ({'FinQA sample' if items is not FALLBACK else 'built-in mix'})")
    print(f"execute:     {execute_rate:10,.0f} programs/s  (target >= 50,000: {'ok' if execute_rate >= 50_000 else 'BELOW'})")
    print(f"equivalent:  {equivalent_rate:10,.0f} pairs/s (sympy, cached per expression)")


if __name__ == "__main__":
    main()
