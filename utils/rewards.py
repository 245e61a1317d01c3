"""Rewards for FinQA responses: one `score()` used by SFT validation, candidates, RL, preferences
and evaluation, plus the batched wrappers TRL's trainers call.

A response is one JSON object `{"program": "<FinQA DSL>", "answer": "<text>"}`. Components
(weights from `reward_spec.yaml`, defaults from the seed):

    exact    +1.0  official execution match of the program, or the answer field matches
                   `exe_ans` when there is no valid program
    numeric  +0.8  only when exact does not hold: within a relative tolerance (5%), aware of
                   percent vs fraction scale ("34.7%" or 34.7 vs 0.34719)
    program  +0.3  x partial match of the program's steps with the gold program
                   (1.0 when symbolically equivalent, as the official program accuracy)
    format   -0.2  when the completion is not exactly the JSON object with a parseable program

Every function is pure (no I/O, no globals, no randomness), takes `(prediction, gold)` in that
order, and never raises on model output: garbage scores as garbage.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from utils.cli import UsageError
from utils.finqa_program import equivalent, execute, program_steps

COMPONENTS = ("exact", "numeric", "program", "format")
MAX_SCAN_CHARS = 20_000  # recovery scans at most this much text; model output can be huge
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class RewardSpec:
    """Weights and tolerances of the reward; `reward_spec.yaml` holds one of these."""
    exact: float = 1.0
    numeric: float = 0.8
    program: float = 0.3
    format: float = -0.2
    numeric_rel_tol: float = 0.05   # relative tolerance of the numeric component
    percent_scale_aware: bool = True  # also accept x100 / /100 of the gold (percent vs fraction)


@dataclass(frozen=True)
class RewardResult:
    """Weighted components (`exact`, `numeric`, `program`, `format`), their `total`, and the
    facts behind them, so metrics and breakdowns never need to rescore."""
    total: float
    exact: float
    numeric: float
    program: float
    format: float
    format_valid: bool
    exact_match: bool
    program_valid: bool
    exec_correct: bool
    answer_correct: bool
    numeric_close: bool
    program_equivalent: bool
    program_match: float
    predicted_program: str | None
    predicted_answer: str | None
    executed_value: float | str | None
    category: str  # correct | numeric_close | wrong_value | invalid_program | format_error

    def to_dict(self) -> dict:
        return asdict(self)


# --- spec ----------------------------------------------------------------------------------

def load_spec(path: str | Path) -> RewardSpec:
    """Read `reward_spec.yaml`: every key of RewardSpec, typed, numbers finite; unknown, missing or
    mistyped keys are errors naming the file, the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward spec {path} not found: run `python 02_build_rewards.py` "
                                f"or pass --reward_spec PATH")
    rebuild = "rebuild it with python 02_build_rewards.py"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        where = getattr(error, "problem_mark", None)
        problem = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "not valid YAML"
        raise UsageError(f"{path}: {problem}{f' at line {where.line + 1}' if where else ''}; {rebuild}") from None
    if raw is None:
        raise UsageError(f"{path}: the file is empty; {rebuild}")
    if not isinstance(raw, dict) or not isinstance(raw.get("weights", {}), dict):
        raise UsageError(f"{path}: expected a mapping with a 'weights' mapping; {rebuild}")
    values = {**raw.get("weights", {}), **{k: v for k, v in raw.items() if k != "weights"}}
    known = {f.name: f.type for f in fields(RewardSpec)}
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        raise UsageError(f"{path}: unknown reward spec keys {unknown}; known: {sorted(known)}; fix the key or "
                         f"{rebuild}")
    missing = [key for key in known if key not in values]
    if missing:  # a key left out would silently take the seed default
        raise UsageError(f"{path}: missing reward spec keys {missing}; {rebuild}")
    for key, value in values.items():
        wanted = bool if known[key] == "bool" else (int, float)
        if not isinstance(value, wanted) or (wanted != bool and (isinstance(value, bool) or not math.isfinite(value))):
            kind = "true/false" if wanted == bool else "a finite number"
            raise UsageError(f"{path}: {key} must be {kind}, got {value!r}; {rebuild}")
    return RewardSpec(**values)


def spec_to_yaml(spec: RewardSpec) -> str:
    data = asdict(spec)
    weights = {name: data.pop(name) for name in COMPONENTS}
    return yaml.safe_dump({"weights": weights, **data}, sort_keys=False)


# --- extraction ----------------------------------------------------------------------------

def _response_object(candidate) -> dict | None:
    if isinstance(candidate, dict) and isinstance(candidate.get("program"), str):
        return candidate
    return None


def extract_response(text: str) -> tuple[dict | None, bool]:
    """Find the response object in a completion.

    Args:
        text: the completion text.
    Returns:
        (object or None, strict) where strict means the whole trimmed text is exactly the JSON
        object with string "program" and "answer" keys and nothing else.
    Example: extract_response('```json\\n{"program": "add(1, 2)", "answer": "3"}\\n```')
             -> ({"program": "add(1, 2)", "answer": "3"}, False)
    """
    if not isinstance(text, str):
        return None, False
    stripped = text.strip()
    try:
        whole = json.loads(stripped)
        if (isinstance(whole, dict) and set(whole) == {"program", "answer"}
                and all(isinstance(v, str) for v in whole.values())):
            return whole, True
        if _response_object(whole):
            return whole, False
    except (ValueError, RecursionError):
        pass
    scan = stripped[:MAX_SCAN_CHARS]
    for block in _FENCE.findall(scan):
        try:
            found = _response_object(json.loads(block))
        except (ValueError, RecursionError):
            continue
        if found:
            return found, False
    decoder = json.JSONDecoder()
    start = scan.find("{")
    for _ in range(50):  # bounded: garbage with many braces must stay cheap
        if start < 0:
            break
        try:
            found = _response_object(decoder.raw_decode(scan, start)[0])
        except (ValueError, RecursionError):
            found = None
        if found:
            return found, False
        start = scan.find("{", start + 1)
    return None, False


def extract_numbers(answer: str) -> list[float]:
    """Numeric readings of an answer text: the first number, divided by 100 when followed by %.

    Example: extract_numbers("$ 1,234.5") -> [1234.5]; extract_numbers("34.7%") -> [0.347]
    """
    if not isinstance(answer, str):
        return []
    match = _NUMBER.search(answer[:MAX_SCAN_CHARS])
    if not match:
        return []
    try:
        value = float(match.group().replace(",", ""))
    except ValueError:
        return []
    if not math.isfinite(value):
        return []
    percent = answer[match.end():].lstrip().startswith("%")
    return [value / 100.0 if percent else value]


def _gold_value(exe_ans):
    """`exe_ans` as float or "yes"/"no" (datasets may have stored numbers as strings)."""
    if isinstance(exe_ans, str) and exe_ans.strip().lower() in ("yes", "no"):
        return exe_ans.strip().lower()
    try:
        return float(exe_ans)
    except (TypeError, ValueError):
        return None


# --- component checks ----------------------------------------------------------------------

def answer_matches(answer: str | None, gold_answer: str | None, exe_ans) -> bool:
    """The answer field states the gold result.

    Matches when it equals FinQA's answer text (case and spaces ignored), says the same yes/no,
    or its number rounds to `exe_ans` at the official 5 decimals.
    Example: answer_matches("34.7%", "34.7%", 0.34719) -> True;
             answer_matches("0.34719", "34.7%", 0.34719) -> True
    """
    if not isinstance(answer, str) or not answer.strip():
        return False
    normalise = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    if isinstance(gold_answer, str) and gold_answer.strip() and normalise(answer) == normalise(gold_answer):
        return True
    gold = _gold_value(exe_ans)
    if isinstance(gold, str):
        return normalise(answer).strip(".") == gold
    return gold is not None and any(round(v, 5) == gold for v in extract_numbers(answer))


def numeric_close(value, exe_ans, rel_tol: float = 0.05, percent_scale_aware: bool = True) -> bool:
    """`value` is within `rel_tol` of the gold number, also at x100 or /100 if scale-aware.

    Example: numeric_close(34.7, 0.34719) -> True (percent vs fraction);
             numeric_close(0.30, 0.34719) -> False
    """
    gold = _gold_value(exe_ans)
    if isinstance(gold, str) or gold is None or isinstance(value, (str, type(None))):
        return False
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    candidates = [value, value / 100.0, value * 100.0] if percent_scale_aware else [value]
    return any(abs(c - gold) <= rel_tol * abs(gold) for c in candidates if math.isfinite(c))


def step_overlap(program: str | None, gold_program: str | None) -> float:
    """Fraction of steps shared (as a multiset) over the longer of the two programs.

    Example: step_overlap("subtract(5, 3), divide(#0, 2)", "subtract(5, 3), divide(#0, 3)") -> 0.5
    """
    predicted, gold = program_steps(program), program_steps(gold_program)
    if not predicted or not gold:
        return 0.0
    shared = sum((Counter(predicted) & Counter(gold)).values())
    return shared / max(len(predicted), len(gold))


# --- score ---------------------------------------------------------------------------------

def score(completion_text: str, example: dict, spec: RewardSpec = RewardSpec()) -> RewardResult:
    """Score one completion against its processed FinQA example.

    Args:
        completion_text: the model's response text.
        example: a processed example (needs `table`, `exe_ans`, `target_program`,
            `target_answer`).
        spec: weights and tolerances.
    Returns:
        RewardResult with weighted components and their total; never raises.
    Example: score('{"program": "divide(114400, 329500)", "answer": "34.7%"}',
                   {"table": [], "exe_ans": 0.34719, "target_program": "divide(114400, 329500)",
                    "target_answer": "34.7%"}).total -> 1.3
    """
    found, strict = extract_response(completion_text)
    program = found.get("program") if found else None
    answer = found.get("answer") if found else None
    answer = answer if isinstance(answer, str) else (None if answer is None else str(answer))
    table = example.get("table") or []
    gold = _gold_value(example.get("exe_ans"))

    executed = execute(program, table) if program is not None else None
    program_valid = executed is not None
    exec_ok = program_valid and gold is not None and executed == gold
    answer_ok = answer_matches(answer, example.get("target_answer"), example.get("exe_ans"))
    exact_hit = exec_ok or (not program_valid and answer_ok)
    value = executed if program_valid else next(iter(extract_numbers(answer)), None)
    close = not exact_hit and numeric_close(value, gold, spec.numeric_rel_tol, spec.percent_scale_aware)
    gold_program = example.get("target_program")
    program_equivalent = (isinstance(program, str) and isinstance(gold_program, str)
                          and equivalent(program, gold_program))
    # program component's partial credit in [0, 1] (RewardResult.program_match)
    match = 1.0 if program_equivalent else step_overlap(program, gold_program)
    format_valid = strict and program_steps(program) is not None

    if exact_hit:
        category = "correct"
    elif found is None:
        category = "format_error"
    elif not program_valid and not close:
        category = "invalid_program"
    else:
        category = "numeric_close" if close else "wrong_value"
    components = {"exact": spec.exact * exact_hit, "numeric": spec.numeric * close,
                  "program": spec.program * match, "format": 0.0 if format_valid else spec.format}
    return RewardResult(
        total=float(sum(components.values())), **{k: float(v) for k, v in components.items()},
        format_valid=format_valid, exact_match=exact_hit, program_valid=program_valid, exec_correct=exec_ok,
        answer_correct=answer_ok, numeric_close=close, program_equivalent=program_equivalent,
        program_match=match, predicted_program=program, predicted_answer=answer,
        executed_value=executed, category=category)


# --- TRL-facing batched wrappers -----------------------------------------------------------

def completion_text(completion) -> str:
    """Text of a TRL completion: a string, or conversational `[{"role", "content"}, ...]`."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return ""


# The training-log reward functions: name (TRL logs rewards/<name>/mean), unweighted value, and
# the spec weight that turns it into its share of score().total. format_error is 1 for an invalid
# format, so its name reads right; its weight is negative.
REWARD_FUNCTIONS = (
    ("exact", lambda r: float(r.exact_match), "exact"),
    ("numeric", lambda r: float(r.numeric_close), "numeric"),
    ("program", lambda r: float(r.program_match), "program"),
    ("format_error", lambda r: float(not r.format_valid), "format"),
)


def trl_reward_functions(spec: RewardSpec = RewardSpec()):
    """Batched reward functions for TRL, one per REWARD_FUNCTIONS entry, and their weights.

    Each `fn(completions, **columns) -> list[float]` returns the unweighted value (exact/numeric:
    0 or 1, program: partial match, format_error: 1 when invalid); pass the returned weights as
    `reward_weights`, so the weighted sum equals `score().total` and TRL logs
    `rewards/<name>/mean`.
    """
    cache = {}  # TRL calls every function on the same batch: score each batch once

    def results(completions, **columns):
        texts = [completion_text(c) for c in completions]
        key = (tuple(texts), tuple(map(str, columns.get("id", []))))
        if key not in cache:
            cache.clear()
            cache[key] = [score(text, {name: columns[name][i] for name in columns}, spec)
                          for i, text in enumerate(texts)]
        return cache[key]

    def function(name, value):
        def reward(completions, **columns):
            return [value(r) for r in results(completions, **columns)]
        reward.__name__ = name
        return reward

    functions = [function(name, value) for name, value, _ in REWARD_FUNCTIONS]
    return functions, [getattr(spec, weight) for _, _, weight in REWARD_FUNCTIONS]


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1), as TRL's nanstd; 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reward_log(results) -> dict[str, float]:
    """One training-log record of a scored batch, with the names and meanings TRL's GRPO and RLOO
    trainers log for the same batch: `reward` and `reward_std` of the weighted total (score().total),
    and `rewards/<name>/mean`, `rewards/<name>/std` of each REWARD_FUNCTIONS value, unweighted.

    Example: a batch of one valid and one invalid completion has rewards/format_error/mean 0.5,
    whatever the format weight; its share of `reward` is weight x 0.5.
    """
    totals = [r.total for r in results]
    record = {"reward": sum(totals) / max(len(totals), 1), "reward_std": _std(totals)}
    for name, value, _ in REWARD_FUNCTIONS:
        values = [value(r) for r in results]
        record[f"rewards/{name}/mean"] = sum(values) / max(len(values), 1)
        record[f"rewards/{name}/std"] = _std(values)
    return record
