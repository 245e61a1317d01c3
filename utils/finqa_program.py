"""The FinQA program DSL: tokenize, execute and compare programs like the official scorer.

The reference is `code/evaluate/evaluate.py` of czyssrs/FinQA. Execution accuracy and program
accuracy here give the same verdict as its `eval_program` and `equal_program` on every input (but
for one bound on model output, below), quirks included, because published FinQA numbers are
computed with them:

- numbers parse with Python's `float` after removing commas; "5%" is 0.05; `const_N` is N and
  `const_m1` is -1; anything else (even "$ 3") is invalid as an argument. Table cells are more
  lenient: "$" is dropped and text from the first "(" on is ignored ("$ 1,234 ( 5% )" -> 1234).
- `#n` is the result of step n; a reference to a missing step makes the program invalid.
- `greater` gives "yes"/"no"; results are rounded to 5 decimals only at the end.
- a program is read as a token list ending in "EOF"; tokens after the last complete step are
  ignored, as the official `split(")")[:-1]` does.
- program equivalence maps each distinct argument string to a symbol and compares the sympy-
  simplified expressions. Table steps are symbols keyed by their text *including* the "|"
  separators the official joins with, so a table step matches only at the same position kind
  (first step vs later step), exactly as the official scorer behaves.
- the one bound on model output: sympy's time grows without limit on some short programs (a
  power tower exp(#0, #0), exp(#1, #1)... of 14 steps took 30 s). Expressions of add, subtract,
  multiply and divide are first compared exactly modulo a large prime (different values: different
  rational functions, which no simplification makes equal), without sympy; a prediction this test
  cannot decide (exp, greater) with more than MAX_SYMBOLIC_STEPS steps (or the gold's + 2, if
  more) counts as not equivalent. No FinQA gold program comes near that length.

Model output is untrusted: nothing here calls eval(). Arithmetic runs on Python floats, whose
`**` raises OverflowError instead of growing without bound, and every error (division by zero,
overflow, malformed program, bad reference) means "invalid" (None / False), never an exception.
"""
from __future__ import annotations

import functools
import math
import operator
import random

import sympy

OPS = ("add", "subtract", "multiply", "divide", "exp", "greater",
       "table_max", "table_min", "table_sum", "table_average")
ARITHMETIC_OPS = OPS[:6]
TABLE_OPS = OPS[6:]


def _greater(a, b):
    return "yes" if a > b else "no"


def _bounded_pow(base, exponent):
    # Only floats reach here from parsed numbers (and float ** float overflows into an
    # exception); ints can come from `table_sum` of an empty row, so cap them explicitly.
    if isinstance(base, int) and isinstance(exponent, int) and abs(exponent) > 1024:
        raise OverflowError("exponent too large")
    return base ** exponent


_ARITHMETIC = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
               "divide": operator.truediv, "exp": _bounded_pow, "greater": _greater}
_TABLE = {"table_max": max, "table_min": min, "table_sum": sum,
          "table_average": lambda row: sum(row) / len(row)}


# --- parsing -------------------------------------------------------------------------------

def tokenize(program: str) -> list[str]:
    """Split a program string into official FinQA tokens, ending with "EOF".

    Example: tokenize("subtract(5829, 5735), divide(#0, 5735)") ->
    ["subtract(", "5829", "5735", ")", "divide(", "#0", "5735", ")", "EOF"]
    """
    tokens = []
    for piece in program.split(", "):
        current = ""
        for char in piece:
            if char == ")" and current:
                tokens.append(current)
                current = ""
            current += char
            if char in "()":
                tokens.append(current)
                current = ""
        if current:
            tokens.append(current)
    tokens.append("EOF")
    return tokens


def str_to_num(text: str) -> float | None:
    """Parse a number as the official scorer does; None where it says "n/a".

    Examples: "1,234" -> 1234.0, "5%" -> 0.05, "const_100" -> 100.0, "const_m1" -> -1.0,
    "$ 3" -> None.
    """
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if "%" in text:
            return float(text.replace("%", "")) / 100.0
        if "const" in text:
            text = text.replace("const_", "")
            return -1.0 if text == "m1" else float(text)
    except ValueError:
        return None
    return None


def table_row_numbers(cells: list[str]) -> list[float] | None:
    """Numbers of a table row's cells (without the row name); None if any cell is not numeric."""
    numbers = []
    for cell in cells:
        number = str_to_num(cell.replace("$", "").strip().split("(")[0].strip())
        if number is None:
            return None
        numbers.append(number)
    return numbers


def _structure_ok(body: list[str]) -> bool:
    """Every 4-token group is `op(`, arg, arg, `)` as far as the official check looks."""
    for index, token in enumerate(body):
        if index % 4 == 0 and token.strip("(") not in OPS:
            return False
        if (index + 1) % 4 == 0 and token != ")":
            return False
    return True


def _split_steps(body: list[str]) -> list[str]:
    return "|".join(body).split(")")[:-1]


def _parse_step(step: str) -> tuple[str, str, str]:
    """(op, arg1, arg2) of a "|"-joined step; raises IndexError/ValueError when malformed."""
    parts = step.split("(")
    if len(parts) > 2:
        raise ValueError("nested parenthesis")
    op = parts[0].strip("|").strip()
    args = parts[1].strip("|").strip().split("|")
    return op, args[0].strip(), args[1].strip()


def _reference(arg: str) -> int:
    return int(arg.replace("#", ""))


# --- execution -----------------------------------------------------------------------------

def execute_tokens(tokens: list[str], table) -> float | str | None:
    """Execute an official token list (last token, normally "EOF", is dropped); None = invalid."""
    result = "n/a"
    try:
        body = tokens[:-1]
        if not _structure_ok(body):
            return None
        results = {}
        row_numbers = None  # the official keeps the last table row across steps
        for index, step in enumerate(_split_steps(body)):
            op, arg1, arg2 = _parse_step(step.strip())
            if op in _ARITHMETIC:
                values = []
                for arg in (arg1, arg2):
                    value = results[_reference(arg)] if "#" in arg else str_to_num(arg)
                    if value is None:
                        return None
                    values.append(value)
                result = _ARITHMETIC[op](*values)
                results[index] = result
            elif "table" in op:
                if "#" in arg1:
                    results[_reference(arg1)]  # noqa: B018 (a bad reference is an error there too)
                else:
                    rows = {row[0]: row[1:] for row in table}
                    if arg1 not in rows:
                        return None
                    row_numbers = table_row_numbers(rows[arg1])
                if row_numbers is None:
                    return None
                if op in _TABLE:
                    result = _TABLE[op](row_numbers)
                results[index] = result
        if result in ("yes", "no", "n/a"):
            return None if result == "n/a" else result
        rounded = float(round(result, 5))
        # inf/nan pass the official rounding but can never equal an answer: call them invalid
        return rounded if math.isfinite(rounded) else None
    except Exception:  # untrusted input: any failure means "invalid"
        return None


def execute(program: str, table) -> float | str | None:
    """Execute a FinQA program string against a table.

    Args:
        program: e.g. "subtract(5829, 5735), divide(#0, 5735)".
        table: list of rows of strings; row[0] is the row name (used by table_* ops).
    Returns:
        The result rounded to 5 decimals, "yes"/"no" for `greater`, or None if invalid.
    Example: execute("subtract(5829, 5735), divide(#0, 5735)", []) -> 0.01639
    """
    if not isinstance(program, str):
        return None
    return execute_tokens(tokenize(program), table)


def exec_correct(pred: str, table, exe_ans) -> bool:
    """Official execution accuracy: the executed prediction equals the gold `exe_ans`."""
    result = execute(pred, table)
    return result is not None and result == exe_ans


# --- program equivalence -------------------------------------------------------------------

_SYMPY_OPS = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
              "divide": operator.truediv, "exp": operator.pow, "greater": sympy.StrictGreaterThan}


MAX_SYMBOLIC_STEPS = 8  # module docstring: exp8 towers take ~1 s of sympy, exp10 2 s, exp14 30 s
# Equal rational functions have equal values modulo a prime wherever no denominator vanishes: different
# values prove two expressions different (equal ones go on to sympy, which gives the official verdict).
_PRIME = 2**61 - 1
_MODULAR = {"add": lambda x, y: (x + y) % _PRIME, "subtract": lambda x, y: (x - y) % _PRIME,
            "multiply": lambda x, y: x * y % _PRIME,
            "divide": lambda x, y: x * pow(y, -1, _PRIME) % _PRIME if y else None}


@functools.lru_cache(maxsize=65536)
def _simplified(expression):
    return sympy.simplify(expression)


def _symbolic(steps: list[str], symbols: dict) -> sympy.Basic:
    """The expression of the last step, built from symbols (official `symbol_recur`)."""
    by_index = dict(enumerate(steps))  # a dict, as the official's: "#-1" is a missing step

    # cached per step: the official recursion rebuilds a step once per reference to it, 2^n times for
    # n steps that each use the previous one twice (add(#0, #0), add(#1, #1), ...): model output may
    @functools.lru_cache(maxsize=None)
    def build(step: str):
        op, arg1, arg2 = _parse_step(step)
        if "table" in op:
            return symbols[step]
        parts = [build(by_index[_reference(arg)]) if "#" in arg else symbols[arg] for arg in (arg1, arg2)]
        return _SYMPY_OPS[op](*parts)
    return build(steps[-1])


def _residue(steps: list[str], symbols: dict) -> int | None:
    """The last step's value modulo _PRIME with every symbol at a fixed pseudo-random residue, or None
    where it is no rational function's value (exp, greater, a division by zero there)."""
    by_index = dict(enumerate(steps))
    point = {key: random.Random(symbol.name).randrange(2, _PRIME) for key, symbol in symbols.items()}

    @functools.lru_cache(maxsize=None)
    def value(step: str):
        op, arg1, arg2 = _parse_step(step)
        if "table" in op:
            return point[step]
        x, y = (value(by_index[_reference(arg)]) if "#" in arg else point[arg] for arg in (arg1, arg2))
        return None if x is None or y is None or op not in _MODULAR else _MODULAR[op](x, y)
    return value(steps[-1])


def equivalent_tokens(pred_tokens: list[str], gold_tokens: list[str]) -> bool:
    """Official program accuracy on token lists (both ending with "EOF")."""
    try:
        gold_steps = [step.strip() for step in _split_steps(gold_tokens[:-1])]
        symbols = {}
        for step in gold_steps:
            op, arg1, arg2 = _parse_step(step)
            keys = [step] if "table" in op else [arg for arg in (arg1, arg2) if "#" not in arg]
            for key in keys:
                symbols.setdefault(key, sympy.Symbol(f"a{len(symbols)}"))
        gold_expression = _simplified(_symbolic(gold_steps, symbols))
    except Exception:  # the official scorer would crash on such a gold program
        return False
    try:
        pred_body = pred_tokens[:-1]
        if not _structure_ok(pred_body):
            return False
        pred_steps = [step.strip() for step in _split_steps(pred_body)]
        for index, step in enumerate(pred_steps):
            op, arg1, arg2 = _parse_step(step)
            if "table" in op:
                if step not in symbols:
                    return False
                continue
            for arg in (arg1, arg2):
                if "#" in arg:
                    if int(arg.strip("#")) >= index:
                        return False
                elif arg not in symbols:
                    return False
        residues = (_residue(pred_steps, symbols), _residue(gold_steps, symbols))
        if None not in residues:
            if residues[0] != residues[1]:
                return False  # different rational functions
        elif len(pred_steps) > max(MAX_SYMBOLIC_STEPS, len(gold_steps) + 2):
            return False  # the bound of the module docstring
        return _simplified(_symbolic(pred_steps, symbols)) == gold_expression
    except Exception:
        return False


def equivalent(pred: str, gold: str) -> bool:
    """Official program accuracy: `pred` is symbolically equivalent to `gold`.

    Example: equivalent("add(3, 2)", "add(2, 3)") -> True;
             equivalent("subtract(3, 2)", "subtract(2, 3)") -> False.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    return equivalent_tokens(tokenize(pred), tokenize(gold))


# --- steps for partial credit --------------------------------------------------------------

def program_steps(program: str) -> list[tuple[str, str, str]] | None:
    """(op, arg1, arg2) per step with numbers normalised ("1,234" and "1234.0" agree), or None
    if the program does not pass the official structure check. Used for partial credit."""
    if not isinstance(program, str):
        return None
    body = tokenize(program)[:-1]
    if not body or not _structure_ok(body):
        return None
    steps = []
    try:
        for step in _split_steps(body):
            op, *args = _parse_step(step.strip())
            normalised = []
            for arg in args:
                number = None if "#" in arg else str_to_num(arg)
                normalised.append(arg if number is None else repr(number))
            steps.append((op, *normalised))
    except (IndexError, ValueError):
        return None
    return steps or None
