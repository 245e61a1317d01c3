"""Write the reward spec and check the reward function on a table of edge cases.

    python 02_build_rewards.py
    python 02_build_rewards.py --set numeric_rel_tol=0.02 --set format=-0.5

Writes outputs/<run_id>/02_rewards/{reward_spec.yaml, unit_tests/test_cases.json,
unit_tests/test_results.json, manifest.json}. Later scripts read reward_spec.yaml (--reward_spec)
and record its sha256. Exits non-zero if any edge case scores other than expected.

Each case states which components must fire (exact, numeric, program match, format) and the
failure category; the expected total is derived from the spec's weights, so the table holds
for any weights. `expected_total_default` is the hand-computed total under the seed weights.
"""
import argparse
import math
from dataclasses import asdict, fields, replace

import yaml

from utils import cli, config, runs
from utils.rewards import RewardSpec, load_spec, score, spec_to_yaml

TABLE = [["", "2019", "2020"], ["revenue", "$ 1,000", "1,200"], ["costs", "400", "500"],
         ["margin", "10%", "12%"]]


def example(program, exe_ans, answer):
    return {"table": TABLE, "target_program": program, "exe_ans": exe_ans, "target_answer": answer}


def response(program, answer):
    return '{"program": "%s", "answer": "%s"}' % (program, answer)


GROWTH = example("subtract(1200, 1000), divide(#0, 1000)", 0.2, "20%")
GREATER = example("greater(1200, 1000)", "yes", "yes")


def case(name, completion, gold, category, exact=False, numeric=False, match=0.0, format_valid=True,
         total=None):
    return {"name": name, "completion": completion, "example": gold,
            "expected": {"category": category, "exact_match": exact, "numeric_close": numeric,
                         "program_match": match, "format_valid": format_valid},
            "expected_total_default": total}


# name, completion, gold example, expected facts, hand-computed total with the seed weights
CASES = [
    case("right program", response("subtract(1200, 1000), divide(#0, 1000)", "20%"), GROWTH,
         "correct", exact=True, match=1.0, total=1.3),
    case("right program, other form", response("divide(1200, 1000), subtract(#0, const_1)", "20%"), GROWTH,
         "correct", exact=True, match=0.0, total=1.0),  # const_1 is not in the gold program
    case("right answer only", response("", "20%"), GROWTH,
         "correct", exact=True, format_valid=False, total=0.8),
    case("right answer, broken program", response("foo(1)", "20%"), GROWTH,
         "correct", exact=True, format_valid=False, total=0.8),
    case("percent scale", response("subtract(1200, 1000), divide(#0, 1000), multiply(#1, const_100)", "20"),
         GROWTH, "numeric_close", numeric=True, match=2 / 3, total=1.0),  # 20.0 vs 0.2
    case("within tolerance", response("subtract(1200, 1000), divide(#0, 1010)", "19.8%"), GROWTH,
         "numeric_close", numeric=True, match=0.5, total=0.95),  # 0.19802 is 1% off
    case("answer only, within tolerance", response("", "20.5%"), GROWTH,
         "numeric_close", numeric=True, format_valid=False, total=0.6),
    case("wrong value", response("subtract(1200, 400)", "800"), GROWTH, "wrong_value", total=0.0),
    case("negative value", response("subtract(1000, 1200)", "-200"), example("subtract(1000, 1200)", -200.0, "-200"),
         "correct", exact=True, match=1.0, total=1.3),
    case("yes/no right", response("greater(1200, 1000)", "yes"), GREATER, "correct", exact=True, match=1.0, total=1.3),
    case("yes/no wrong", response("greater(1000, 1200)", "no"), GREATER, "wrong_value", total=0.0),
    case("yes/no answer only", response("", "Yes"), GREATER, "correct", exact=True, format_valid=False, total=0.8),
    case("table_max", response("table_max(revenue, none)", "1200"), example("table_max(revenue, none)", 1200.0, "1200"),
         "correct", exact=True, match=1.0, total=1.3),
    case("table_min", response("table_min(costs, none)", "400"), example("table_min(costs, none)", 400.0, "400"),
         "correct", exact=True, match=1.0, total=1.3),
    case("table_sum", response("table_sum(revenue, none)", "2200"), example("table_sum(revenue, none)", 2200.0, "2200"),
         "correct", exact=True, match=1.0, total=1.3),
    case("table_average of percents", response("table_average(margin, none)", "11%"),
         example("table_average(margin, none)", 0.11, "11%"), "correct", exact=True, match=1.0, total=1.3),
    case("constants", response("multiply(400, const_m1)", "-400"), example("multiply(400, const_m1)", -400.0, "-400"),
         "correct", exact=True, match=1.0, total=1.3),
    case("#n chain", response("add(1000, 1200), add(#0, 400), divide(#1, const_3)", "866.7"),
         example("add(1000, 1200), add(#0, 400), divide(#1, const_3)", 866.66667, "866.7"),
         "correct", exact=True, match=1.0, total=1.3),
    case("malformed JSON", '{"program": "subtract(1200, 1000), divide(#0, 1000)", "answer": ', GROWTH,
         "format_error", format_valid=False, total=-0.2),
    case("empty", "", GROWTH, "format_error", format_valid=False, total=-0.2),
    case("code fences", "```json\n" + response("subtract(1200, 1000), divide(#0, 1000)", "20%") + "\n```", GROWTH,
         "correct", exact=True, match=1.0, format_valid=False, total=1.1),
    case("surrounding text", "Sure! " + response("subtract(1200, 1000), divide(#0, 1000)", "20%") + " Hope it helps.",
         GROWTH, "correct", exact=True, match=1.0, format_valid=False, total=1.1),
    case("garbage", "lorem ipsum }{ ]] dolor", GROWTH, "format_error", format_valid=False, total=-0.2),
    case("huge exponent", response("exp(10, 100000)", "inf"), GROWTH, "invalid_program", total=0.0),
    case("division by zero", response("divide(1200, 0)", "n/a"), GROWTH, "invalid_program", total=0.0),
    case("forward reference", response("divide(#1, 1000)", "?"), GROWTH, "invalid_program", total=0.0),
    case("answer is a number", '{"program": "subtract(1200, 1000), divide(#0, 1000)", "answer": 0.2}', GROWTH,
         "correct", exact=True, match=1.0, format_valid=False, total=1.1),  # answer must be a string
    case("extra key", '{"program": "subtract(1200, 1000), divide(#0, 1000)", "answer": "20%", "why": "x"}', GROWTH,
         "correct", exact=True, match=1.0, format_valid=False, total=1.1),
    case("JSON list", '["subtract(1200, 1000)"]', GROWTH, "format_error", format_valid=False, total=-0.2),
    case("deep nesting", "[" * 5_000 + "]" * 5_000, GROWTH, "format_error", format_valid=False, total=-0.2),
    case("non-finite", response("add(inf, 1)", "inf"), GROWTH, "invalid_program", total=0.0),
    case("first step right", response("subtract(1200, 1000), divide(#0, 1200)", "16.7%"), GROWTH,
         "wrong_value", match=0.5, total=0.15),
]

CHECKED_FACTS = ("category", "exact_match", "numeric_close", "format_valid")


def expected_total(expected: dict, spec: RewardSpec) -> float:
    return (spec.exact * expected["exact_match"] + spec.numeric * expected["numeric_close"]
            + spec.program * expected["program_match"] + (0.0 if expected["format_valid"] else spec.format))


def run_case(item: dict, spec: RewardSpec) -> dict:
    result = score(item["completion"], item["example"], spec)
    expected = item["expected"]
    problems = [f"{fact}: expected {expected[fact]!r}, got {getattr(result, fact)!r}"
                for fact in CHECKED_FACTS if getattr(result, fact) != expected[fact]]
    if abs(result.program_match - expected["program_match"]) > 1e-9:
        problems.append(f"program_match: expected {expected['program_match']:.4f}, got {result.program_match:.4f}")
    want = expected_total(expected, spec)
    if abs(result.total - want) > 1e-9:
        problems.append(f"total: expected {want:.4f}, got {result.total:.4f}")
    return {"name": item["name"], "passed": not problems, "problems": problems,
            "expected_total": round(want, 6), "result": result.to_dict()}


def parse_settings(settings: list[str], base: RewardSpec) -> RewardSpec:
    """Apply `--set key=value` to the spec, typed like the field; errors name the flag."""
    types = {f.name: f.type for f in fields(RewardSpec)}
    changes = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or key not in types:
            raise cli.UsageError(f"--set {setting!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        value = yaml.safe_load(text)
        wanted = bool if types[key] == "bool" else (int, float)
        if not isinstance(value, wanted) or (wanted != bool and (isinstance(value, bool) or not math.isfinite(value))):
            raise cli.UsageError(f"--set {setting!r}: {key} must be {types[key]} (finite)")
        changes[key] = value
    return replace(base, **changes)


def main(args, extra_tokens=()) -> dict:
    cfg = config.from_args(args, extra_tokens)
    folder = runs.module_dir(args.run_id, "02_rewards", cfg["paths"]["output_dir"], cfg["paths"]["output_root"])
    spec = parse_settings(args.set, load_spec(args.spec) if args.spec else RewardSpec())
    with runs.Manifest(folder, "02_build_rewards", args, cfg, seed=cfg["training"]["seed"]) as manifest:
        if args.spec:
            manifest.add_input("base_spec", args.spec)
        spec_path = runs.atomic_write_text(folder / "reward_spec.yaml", spec_to_yaml(spec))
        cases_path = runs.atomic_write_json(folder / "unit_tests" / "test_cases.json", CASES)
        results = [run_case(item, spec) for item in CASES]
        results_path = runs.atomic_write_json(folder / "unit_tests" / "test_results.json", results)
        for name, path in (("reward_spec", spec_path), ("test_cases", cases_path), ("test_results", results_path)):
            manifest.add_output(name, path)
        failed = [r for r in results if not r["passed"]]
        manifest.metrics.update({"cases": len(results), "passed": len(results) - len(failed),
                                 "failed": len(failed), "reward_spec_sha256": runs.sha256_file(spec_path)})
        print(f"reward spec: {spec_path}\n  {asdict(spec)}")
        for r in results:
            print(f"  {'ok  ' if r['passed'] else 'FAIL'} {r['name']:<32} total {r['result']['total']:+.3f}"
                  f"  {r['result']['category']}" + "".join(f"\n       {p}" for p in r["problems"]))
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise cli.JobFailed(f"{len(failed)} of {len(results)} reward unit tests failed "
                            f"({', '.join(r['name'] for r in failed)}); see {results_path}")
    return manifest.metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(parser)
    parser.add_argument("--spec", default=None,
                        help="start from this reward_spec.yaml instead of the seed defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one spec value, e.g. --set numeric_rel_tol=0.02 --set format=-0.5 "
                             f"(keys: {', '.join(f.name for f in fields(RewardSpec))})")
    return parser.parse_known_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
