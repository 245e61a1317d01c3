"""Scoring never fails: fuzz the reward (utils.rewards.score) and the FinQA program executor with
hypothesis-generated completions, count them and the exceptions (which must be 0).

    python tests/benchmarks/bench_fuzz_scoring.py                     # 100,000 completions, seed 0
    python tests/benchmarks/bench_fuzz_scoring.py --n 2000 --seed 3

Each completion is one hypothesis example: hypothesis draws its structure (which kind, sizes, where
to break it, and a seed) and a random.Random of that seed builds the bulk, so very long programs
stay cheap to generate. Kinds: random unicode text; JSON objects whose program/answer fields hold
any JSON type; nested JSON (thousands of levels deep); very long programs (hundreds of steps); deep
#n reference chains (each step uses the previous ones, up to hundreds of steps); huge and tiny
numbers (1e308, 1e-308, 1e309, 400-digit integers, inf, nan); unicode mixed into programs and
answers (RTL marks, emojis, zero-width characters, other scripts' digits); malformed parentheses.
A completion is wrapped as the bare JSON answer, in a code fence, in prose, as raw text, or cut off.

For every completion: score() against one of a few fixed examples, and the executor (tokenize,
execute_tokens, execute, equivalent) on the program extracted from it, or on the raw text when
none is. Every exception is counted with its type and a sample input. Prints
"completions: N, exceptions: E", the throughput and the slowest call; exits 1 when E > 0 or a
call reached --max_call_s (it is interrupted there, so a hang is reported rather than waited for).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from utils.finqa_program import OPS, equivalent, execute, execute_tokens, tokenize  # noqa: E402
from utils.rewards import extract_response, score  # noqa: E402

TABLE = [["", "2019", "2020"], ["revenue", "$ 1,000", "1,200"], ["costs", "400", "500"], ["margin", "10%", "12%"]]
EXAMPLES = [  # the fixed gold examples a completion is scored against: (gold program, exe_ans, answer text)
    {"table": TABLE, "target_program": gold, "exe_ans": exe_ans, "target_answer": answer}
    for gold, exe_ans, answer in (("subtract(1200, 1000), divide(#0, 1000)", 0.2, "20%"),
                                  ("greater(1200, 1000)", "yes", "yes"),
                                  ("table_average(margin, none)", 0.11, "11%"),
                                  ("exp(1200, const_2), add(#0, 400)", 1440400.0, "1440400"))]
# arguments of the programs that are not reference chains: the table's numbers and rows, constants
ARGUMENTS = ["1200", "1000", "400", "500", "2", "const_2", "const_100", "const_m1", "none", "revenue", "margin",
             "costs"]
HUGE_NUMBERS = ["1e308", "-1e308", "1e-308", "1e309", "-1e-320", "9" * 400, "1" + "0" * 1000, "0." + "0" * 500 + "1",
                "inf", "-inf", "nan", "NaN", "1e400%", "const_1e308", "1,000,000,000,000,000,000,000", "-0", "0"]
# RTL and LTR overrides, zero-width and no-break spaces, emojis (a ZWJ sequence), Arabic-Indic, fullwidth and
# Devanagari digits, a minus sign, a superscript, a combining accent, a ligature, a math digit, NUL
UNICODE = ["\u202e", "\u202d", "\u200f", "\u200b", "\u200d", "\ufeff", "\u00a0", "\U0001f4b0",
           "\U0001f600\u200d\U0001f525", "\u0663\u0664", "\uff11\uff12", "\u0967", "\u2212", "\u00b2", "\u0301",
           "\ufdfd", "\U0001d7d9", "\u3000", "\x00"]
BREAKERS = ["(", ")", "((", "))", ",", ", ", "#", "#-1", "#999999", "|", "EOF", "\n", "\"", "\\", "{", "}", ""]
WRAPPERS = ("json", "json", "fenced", "prose", "raw", "cut")
ARITHMETIC_OPS = ("add", "subtract", "multiply", "divide", "exp")


# --- completions ---------------------------------------------------------------------------------

def gold_arguments(example: dict) -> list[str]:
    """The numbers and row names of the example's gold program: a program of only these (and #n)
    takes program equivalence all the way to sympy."""
    return [t for t in tokenize(example["target_program"])[:-1] if not t.endswith("(") and t != ")" and "#" not in t]


def argument(rng: random.Random, step: int, kind: str, gold: list[str]) -> str:
    """One argument of step `step`: mostly numbers of the gold programs and earlier results."""
    roll = rng.random()
    if kind == "chain":  # each step uses earlier results, the rest are the gold's own arguments
        if not step or roll < 0.2:
            return rng.choice(gold)
        return f"#{rng.randrange(step)}" if roll < 0.5 else f"#{step - 1}"
    if kind == "huge" and roll < 0.5:
        return rng.choice(HUGE_NUMBERS)
    if kind == "unicode" and roll < 0.4:
        return rng.choice(ARGUMENTS) + rng.choice(UNICODE)
    if roll < 0.15 and step:
        return f"#{rng.randrange(step + 2) - 1}"  # sometimes a forward or negative reference
    return rng.choice(ARGUMENTS)


def program(rng: random.Random, steps: int, kind: str, gold: list[str]) -> str:
    """A program of `steps` steps; "chain" makes each step use earlier results (exp(#0, #0), ...)."""
    parts = []
    for step in range(steps):
        op = rng.choice(ARITHMETIC_OPS if kind == "chain" else OPS)  # a table op ends equivalence early
        parts.append(f"{op}({argument(rng, step, kind, gold)}, {argument(rng, step, kind, gold)})")
    text = ", ".join(parts)
    if kind == "malformed":
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(BREAKERS) + text[at + rng.randrange(3):]
    if kind == "unicode":
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(UNICODE) + text[at:]
    return text


def nested_json(rng: random.Random, depth: int) -> str:
    """JSON text nested `depth` levels deep (lists and objects, a program field at some levels), written
    piece by piece: json.dumps itself stops at about 1,000 levels."""
    opening, closing = [], []
    for level in range(depth):
        if rng.random() < 0.5:
            opening.append("[")
            closing.append("]")
        else:
            key = "program" if level % 7 == 0 else "k"
            opening.append(f'{{"{key}": ')
            closing.append(f', "answer": {level}}}' if key == "program" else "}")
    leaf = json.dumps(rng.choice([None, True, 1.5e308, "x", -0.0, 10**30, program(rng, 2, "plain", ARGUMENTS)]))
    return "".join(opening) + leaf + "".join(reversed(closing))


def json_value(rng: random.Random):
    """Any JSON type for a program or answer field."""
    return rng.choice([None, True, False, 0, -1, 1e308, 2**70, "", "20%", [], {}, ["add(1, 2)"],
                       {"program": "add(1, 2)"}, program(rng, rng.randrange(1, 4), "plain", ARGUMENTS),
                       rng.choice(UNICODE) * 3])


def wrap(rng: random.Random, how: str, prog, answer) -> str:
    """The completion text around a program and an answer (objects as the response JSON)."""
    body = json.dumps({"program": prog, "answer": answer}, ensure_ascii=rng.random() < 0.5)
    if how == "fenced":
        return f"```json\n{body}\n```"
    if how == "prose":
        return f"Sure! {rng.choice(UNICODE)} {body} {{ hope it helps }}"
    if how == "raw":
        return prog if isinstance(prog, str) else body
    if how == "cut":
        return body[:rng.randrange(len(body) + 1)]
    return body


def completion(kind: str, size: int, how: str, seed: int, text: str, example: dict) -> str:
    """One completion of a kind for an example; `text` is hypothesis's own random unicode, `size` the size knob."""
    rng = random.Random(seed)
    if kind == "text":
        return text
    if kind == "json":
        return wrap(rng, how, json_value(rng), json_value(rng))
    if kind == "nested":
        depth = 3 * size  # up to 3,000 levels: past json's recursion limit (about 1,000)
        return nested_json(rng, depth) if rng.random() < 0.5 else "[" * depth + "]" * rng.randrange(depth + 1)
    steps = {"long": 100 + size // 3, "chain": 2 + size // 4}.get(kind, 1 + size % 8)
    answer = rng.choice([text[:20], "20%", rng.choice(HUGE_NUMBERS), "yes", rng.choice(UNICODE) + "1200"])
    return wrap(rng, how, program(rng, steps, kind, gold_arguments(example)), answer)


def completions(kind: str, size: int, how: str, seed: int, text: str, example: dict) -> tuple[list[str], dict]:
    """(PER_EXAMPLE completions, the example they are scored against) of one hypothesis example: the first
    completion as drawn, the others with the next seeds and wrappers (hypothesis's own overhead, about 2 ms
    an example, would otherwise dominate)."""
    hows = [how, *random.Random(seed).sample(WRAPPERS, PER_EXAMPLE - 1)]
    texts = [completion(kind, size, variant, seed + offset, text, example) for offset, variant in enumerate(hows)]
    return texts, example


PER_EXAMPLE = 4
KINDS = ("text", "json", "nested", "long", "chain", "huge", "unicode", "malformed", "plain")
COMPLETIONS = st.builds(completions, kind=st.sampled_from(KINDS), size=st.integers(0, 1000),
                        how=st.sampled_from(WRAPPERS), seed=st.integers(0, 2**32),
                        text=st.text(st.characters(exclude_categories=("Cs",)), max_size=300),  # Cs: surrogates
                        example=st.sampled_from(EXAMPLES))


# --- the fuzzing -----------------------------------------------------------------------------------

@dataclass
class Report:
    examples: int = 0  # hypothesis examples, PER_EXAMPLE completions each
    completions: int = 0
    exceptions: int = 0
    by_type: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)  # score()'s verdicts: what the inputs reached
    samples: dict = field(default_factory=dict)  # exception type -> (function, input, message)
    slowest: tuple = (0.0, "")                    # (seconds, input)
    slow: int = 0                                 # calls that reached max_call_s (interrupted there)
    seconds: float = 0.0


class CallTimeout(BaseException):
    """Raised into a call that runs past max_call_s; a BaseException, so the scorer's own `except
    Exception` (which turns errors into "invalid") cannot swallow it."""


_armed = False  # a call is running under timed(): the alarm may interrupt it


def _interrupt(signum, frame):
    if _armed:
        raise CallTimeout


def timed(report: Report, name: str, call, sample, max_call_s: float):
    """call() with its exception (counted, by type, with a sample input) and its time recorded; a call
    reaching max_call_s is interrupted (SIGALRM; fuzz() installs the handler) and counted slow, so a hang
    is reported instead of hanging. None on failure."""
    global _armed
    # the alarm repeats: one that lands in a garbage-collector callback is ignored by Python
    signal.setitimer(signal.ITIMER_REAL, max_call_s, 0.05)
    started = time.perf_counter()
    try:
        _armed = True
        try:
            return call()
        finally:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CallTimeout:
        return None  # counted below as slow
    except Exception as error:  # the thing counted: nothing here may raise
        report.exceptions += 1
        report.by_type[type(error).__name__] += 1
        report.samples.setdefault(type(error).__name__, (name, repr(sample)[:300], str(error)[:300]))
        return None
    finally:
        seconds = time.perf_counter() - started
        if seconds > report.slowest[0]:
            report.slowest = (seconds, f"{name} on {repr(sample)[:200]}")
        report.slow += seconds >= max_call_s


def run_executor(prog, table, gold_program: str):
    """tokenize, execute_tokens, execute and equivalent on one program (any type: they must take it)."""
    tokens = tokenize(prog) if isinstance(prog, str) else [prog, "EOF"]
    return execute_tokens(tokens, table), execute(prog, table), equivalent(prog, gold_program)


def check(text: str, example: dict, report: Report, max_call_s: float) -> None:
    """Score one completion and run the executor on its program (or on the raw text when it has none)."""
    result = timed(report, "score", lambda: score(text, example), text, max_call_s)
    if result is not None:
        report.categories[result.category] += 1
    found = timed(report, "extract_response", lambda: extract_response(text), text, max_call_s)
    prog = found[0].get("program") if found and isinstance(found[0], dict) else text
    timed(report, "executor", lambda: run_executor(prog, example["table"], example["target_program"]), prog,
          max_call_s)


def fuzz(n: int, seed: int = 0, max_call_s: float = 5.0) -> Report:
    """Run at least n hypothesis-generated completions through check(); returns the counts."""
    report = Report()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        run_examples(n, seed, max_call_s, report)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.seconds = time.perf_counter() - started
    return report


def run_examples(n: int, seed: int, max_call_s: float, report: Report) -> None:
    """check() on hypothesis examples until report.completions reaches n."""
    attempt = 0
    while report.completions < n:  # hypothesis may stop short of max_examples: go on with another seed

        @hypothesis_seed(seed + attempt)
        @settings(max_examples=-(-(n - report.completions) // PER_EXAMPLE), database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(COMPLETIONS)
        def one(drawn):
            texts, example = drawn
            report.examples += 1
            for text in texts:
                report.completions += 1
                check(text, example, report, max_call_s)

        before = report.completions
        one()
        attempt += 1
        if report.completions == before:
            break  # nothing new generated: report the honest count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="completions to generate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    parser.add_argument("--max_call_s", type=float, default=5.0,
                        help="a call reaching this is interrupted and counts as a failure: scoring must not "
                             "hang (default: %(default)s)")
    args = parser.parse_args(argv)
    report = fuzz(args.n, args.seed, args.max_call_s)
    print(f"completions: {report.completions}, exceptions: {report.exceptions}")
    print(f"hypothesis examples: {report.examples} ({PER_EXAMPLE} completions each), seed {args.seed}")
    print(f"time: {report.seconds:.1f} s, {report.completions / max(report.seconds, 1e-9):,.0f} completions/s "
          f"(each: score, extract_response, tokenize, execute_tokens, execute, equivalent)")
    print("score categories: " + ", ".join(f"{name} {count}" for name, count in report.categories.most_common()))
    print(f"slowest call: {report.slowest[0]:.3f} s, {report.slowest[1][:120]}; "
          f"calls that reached {args.max_call_s} s (interrupted): {report.slow}")
    for name, count in report.by_type.most_common():
        function, sample, message = report.samples[name]
        print(f"  {name} x{count} in {function}: {message} <- {sample!r}")
    failed = report.exceptions > 0 or report.slow > 0 or report.completions < args.n
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
