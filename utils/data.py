"""FinQA examples -> chat prompts and processed JSONL rows (the contract in DESIGN.md).

One raw FinQA example (official format) becomes one processed row: a system prompt stating the
response format, a user turn "Context: ... Question: ...", and the canonical assistant response
`{"program": ..., "answer": ...}`. The context comes from one of three modes:

- "retrieved": `qa.model_input`, the FinQA baseline retriever's top facts (non-oracle, default);
- "gold": `qa.gold_inds`, the annotated supporting facts (an oracle: label results so);
- "full": pre_text, the table as "row name | cell | cell" lines, post_text, cut to a token budget.

Example:
    raw = load_finqa_split("datasets/finqa/dev.json")[0]
    row = to_processed(raw, "val", "retrieved")
    row["prompt"][1]["content"]   # "Context:\n...\n\nQuestion: ..."
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from utils import runs
from utils.cli import UsageError
from utils.finqa_program import tokenize

CONTEXT_MODES = ("retrieved", "gold", "full")
PROCESSED_FIELDS = ("id", "split", "source", "question", "context", "context_mode", "table",
                    "prompt", "completion", "input_text", "target_program", "target_answer",
                    "exe_ans", "gold_inds", "level")
REWARD_FIELDS = ("table", "exe_ans", "target_program", "target_answer")  # what utils.rewards.score reads
PREPARE = "01_prepare_dataset.py"  # the script that writes processed splits
GET_DATA_HINT = ("bash download.sh (online) or "
                 "bash download.sh --from ../shared/data/finqa-sample (offline)")
# validate_example() reports facts that do not make an example unusable with this prefix.
NOTE_PREFIX = "note: "

# Short on purpose: every token is paid on every prompt of a 135M model (139 SmolLM2 tokens).
SYSTEM_PROMPT = (
    'Reply with one JSON object only: {"program": "...", "answer": "..."}\n'
    'Program: steps op(x, y) joined by ", ". Ops: add, subtract, multiply, divide, exp, '
    "greater (yes/no); table_max, table_min, table_sum, table_average take (row name, none). "
    "Args: context numbers as written, const_N (const_m1 = -1), #n = result of step n (from 0).\n"
    'Example: {"program": "subtract(52, 40), divide(#0, 40)", "answer": "30%"}'
)


class DataError(UsageError):
    """A data file or example is unusable; the message names the file/field and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A raw data file is missing (also a FileNotFoundError, for callers that catch that)."""


# --- loading -------------------------------------------------------------------------------

def load_finqa_split(path) -> list[dict]:
    """Read one official FinQA split file (a JSON list of examples).

    Raises DataError (DataFileNotFoundError when missing) naming the file, the position of a JSON
    error, and how to get the data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"FinQA file not found: {path}. Get the data with {GET_DATA_HINT}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                        f"{error.msg}). Re-download it with {GET_DATA_HINT}.") from None
    except RecursionError:  # json recurses once per bracket
        raise DataError(f"{path} is not valid JSON (nested too deeply to read). "
                        f"Re-download it with {GET_DATA_HINT}.") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}). "
                        f"Re-download it with {GET_DATA_HINT}.") from None
    if not isinstance(data, list):
        raise DataError(f"{path} should hold a JSON list of FinQA examples, found "
                        f"{type(data).__name__}. Re-download it with {GET_DATA_HINT}.")
    return data


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def validate_example(raw) -> list[str]:
    """Problems that make a raw FinQA example unusable; items starting with NOTE_PREFIX are
    facts worth reporting (ragged table) that do not. An empty list means the example is fine."""
    if not isinstance(raw, dict):
        return [f"example is a {type(raw).__name__}, not an object"]
    problems = []
    if not isinstance(raw.get("id"), str) or not raw.get("id"):
        problems.append("id: missing or not a non-empty string")
    for field in ("pre_text", "post_text"):
        if not _is_str_list(raw.get(field)):
            problems.append(f"{field}: missing or not a list of strings")
    table = raw.get("table")
    if not isinstance(table, list) or not all(_is_str_list(row) for row in table):
        problems.append("table: missing or not a list of rows of strings")
    elif not table or any(not row for row in table):
        problems.append("table: empty, or has an empty row (no row name)")
    elif len({len(row) for row in table}) > 1:
        lengths = sorted({len(row) for row in table})
        problems.append(f"{NOTE_PREFIX}table rows have different lengths {lengths}")
    qa = raw.get("qa")
    if not isinstance(qa, dict):
        return problems + ["qa: missing or not an object"]
    for field in ("question", "program"):
        if not isinstance(qa.get(field), str) or not qa.get(field, "").strip():
            problems.append(f"qa.{field}: missing or empty")
    if not isinstance(qa.get("answer"), str):
        problems.append("qa.answer: missing or not a string")
    exe_ans = qa.get("exe_ans")
    if not (exe_ans in ("yes", "no") or is_finite_number(exe_ans)):
        problems.append(f"qa.exe_ans: should be a number, 'yes' or 'no', found {runs.short_repr(exe_ans)}")
    gold = qa.get("gold_inds")
    if not isinstance(gold, dict) or not all(_fact_key_ok(k) and isinstance(v, str)
                                             for k, v in gold.items()):
        problems.append("qa.gold_inds: missing or not a {'text_N'|'table_N': str} object")
    model_input = qa.get("model_input")
    if not isinstance(model_input, list) or not all(
            isinstance(item, list) and len(item) == 2 and _is_str_list(item) for item in model_input):
        problems.append("qa.model_input: missing or not a list of [key, text] pairs")
    return problems


def is_finite_number(value) -> bool:
    """An int or float that is not a bool, NaN or infinite (json reads NaN and Infinity as floats)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fact_key_ok(key) -> bool:
    kind, _, index = str(key).partition("_")
    return kind in ("text", "table") and index.isdigit()


# --- context -------------------------------------------------------------------------------

def render_table(table) -> list[str]:
    """Table rows as text lines "row name | cell | cell" (header row included)."""
    return [" | ".join(cell.strip() for cell in row).strip() for row in table]


def _fact_position(key: str, num_pre: int) -> tuple[int, int]:
    """Document order of a fact key: pre_text sentences, table rows, post_text sentences.

    FinQA numbers text facts over pre_text + post_text, so text_N with N >= len(pre_text) comes
    after the table. `qa.model_input` is already in this order; gold facts follow it too."""
    kind, _, index = key.partition("_")
    index = int(index)
    if kind == "table":
        return 1, index
    return (0, index) if index < num_pre else (2, index)


def _qa(raw) -> dict:
    qa = raw.get("qa") if isinstance(raw, dict) else None
    if not isinstance(qa, dict):
        raise DataError(f"example {_example_id(raw)}: field 'qa' missing or not an object")
    return qa


def _example_id(raw) -> str:
    return repr(raw.get("id")) if isinstance(raw, dict) else "<not an object>"


def build_context(example_raw, mode: str, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
    """The context text of one raw FinQA example for a context mode.

    Args:
        example_raw: one example in the official FinQA format.
        mode: "retrieved", "gold" or "full" (see the module docstring).
        tokenizer: used only by "full" to measure the prompt (chat template included when the
            tokenizer has one).
        max_prompt_tokens: "full" budget for the whole prompt (system + context + question);
            None or 0 = no limit. The question is never cut: the context loses post_text
            sentences from the end, then pre_text from the end, then table rows from the end.
    Returns:
        Context lines joined with newlines.
    """
    if mode not in CONTEXT_MODES:
        raise ValueError(f"unknown context mode {mode!r}; valid modes: {', '.join(CONTEXT_MODES)}")
    qa = _qa(example_raw)
    if mode == "retrieved":
        facts = qa.get("model_input")
        if not isinstance(facts, list):
            raise DataError(f"example {_example_id(example_raw)}: qa.model_input missing; "
                            "use --context_mode gold or full")
        return "\n".join(text for _key, text in facts)
    if mode == "gold":
        gold = qa.get("gold_inds")
        if not isinstance(gold, dict):
            raise DataError(f"example {_example_id(example_raw)}: qa.gold_inds missing")
        num_pre = len(example_raw.get("pre_text") or [])
        keys = sorted(gold, key=lambda key: _fact_position(key, num_pre))
        return "\n".join(gold[key] for key in keys)
    return _full_context(example_raw, qa, tokenizer, max_prompt_tokens)


def _full_context(raw, qa, tokenizer, max_prompt_tokens) -> str:
    pre = list(raw.get("pre_text") or [])
    table = render_table(raw.get("table") or [])
    post = list(raw.get("post_text") or [])
    if not max_prompt_tokens:
        return "\n".join(pre + table + post)
    if tokenizer is None:
        raise ValueError("context mode 'full' with max_prompt_tokens needs a tokenizer "
                         "(or max_prompt_tokens=None for no limit)")
    question = qa.get("question", "")

    # Lines in the order they are dropped; keeping the first k of them, in document order.
    drop_order = post[::-1] + pre[::-1] + table[::-1]
    total = len(drop_order)

    def context_without(num_dropped: int) -> str:
        kept_post = post[:max(0, len(post) - num_dropped)]
        num_dropped = max(0, num_dropped - len(post))
        kept_pre = pre[:max(0, len(pre) - num_dropped)]
        num_dropped = max(0, num_dropped - len(pre))
        kept_table = table[:max(0, len(table) - num_dropped)]
        return "\n".join(kept_pre + kept_table + kept_post)

    def fits(num_dropped: int) -> bool:
        messages = build_prompt(question, context_without(num_dropped))
        return count_prompt_tokens(messages, tokenizer) <= max_prompt_tokens

    # Token counts fall as lines are dropped, so binary search the fewest drops that fit.
    if fits(0):
        return context_without(0)
    low, high = 1, total
    if not fits(high):
        return ""  # the question alone is over budget: keep it whole, with no context
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return context_without(low)


def count_prompt_tokens(messages: list[dict], tokenizer) -> int:
    """Tokens of a chat prompt as the model sees it (chat template and generation prompt
    included when the tokenizer has a template; plain text otherwise)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt_as_text(messages)
    return len(tokenizer.encode(text, add_special_tokens=False))


# --- prompt and response -------------------------------------------------------------------

def build_prompt(question: str, context: str) -> list[dict]:
    """Chat messages: the system prompt and a user turn with the context and the question."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


def prompt_as_text(messages: list[dict]) -> str:
    """The prompt as plain text (the `input_text` field): message contents joined."""
    return "\n\n".join(message["content"] for message in messages)


def canonical_response(program: str, answer: str) -> str:
    """The SFT target: exactly `json.dumps({"program": program, "answer": answer})`."""
    return json.dumps({"program": program, "answer": answer})


def format_number(value: float) -> str:
    """A number as FinQA's answers write it: no trailing zeros ("1393", "0.34719", "-2.5")."""
    if not math.isfinite(value):
        return str(value)
    text = f"{round(value, 5):.5f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def answer_text(qa: dict) -> str:
    """FinQA's answer text (qa.answer); where it is empty, exe_ans written as a number."""
    answer = qa.get("answer")
    if isinstance(answer, str) and answer.strip():
        return answer
    exe_ans = qa.get("exe_ans")
    if isinstance(exe_ans, (int, float)) and not isinstance(exe_ans, bool):
        return format_number(float(exe_ans))
    return str(exe_ans) if exe_ans is not None else ""


# --- processed rows ------------------------------------------------------------------------

def to_processed(raw: dict, split: str, mode: str, source: str = "finqa", tokenizer=None,
                 max_prompt_tokens: int | None = None) -> dict:
    """One processed row (fields PROCESSED_FIELDS, see DESIGN.md) from a raw FinQA example.

    Raises DataError naming the example id when the question or program is missing.
    """
    qa = _qa(raw)
    question, program = qa.get("question"), qa.get("program")
    for field, value in (("question", question), ("program", program)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"example {_example_id(raw)}: qa.{field} missing or empty")
    context = build_context(raw, mode, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
    prompt = build_prompt(question, context)
    answer = answer_text(qa)
    return {
        "id": raw.get("id"),
        "split": split,
        "source": source,
        "question": question,
        "context": context,
        "context_mode": mode,
        "table": raw.get("table") or [],
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": canonical_response(program, answer)}],
        "input_text": prompt_as_text(prompt),
        "target_program": program,
        "target_answer": answer,
        "exe_ans": qa.get("exe_ans"),
        "gold_inds": qa.get("gold_inds") or {},
        "level": program_level(program),
    }


def program_level(program: str) -> int:
    """The difficulty level of a gold program: its number of steps (an op token per step), the
    synthetic ladder's level, and the split FinQA results are reported by (one-step questions)."""
    return sum(token.endswith("(") for token in tokenize(program)[:-1])


# --- reading processed splits ----------------------------------------------------------------

def is_id(value) -> bool:
    """An example id as the pipeline writes it: a string (or an int), never a bool."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def is_messages(value) -> bool:
    """A chat in TRL's conversational form: a non-empty list of {role, content} messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


# What each processed field holds; read_processed checks every one a row has. exe_ans may be text:
# "yes"/"no", or a number that a dataset library wrote as text (utils.rewards reads both).
_FIELD_TYPES = {
    "id": (is_id, "a string"),
    "prompt": (is_messages, "a list of {role, content} messages"),
    "completion": (is_messages, "a list of {role, content} messages"),
    "table": (lambda v: isinstance(v, list) and all(_is_str_list(row) for row in v), "a list of rows of strings"),
    "exe_ans": (lambda v: isinstance(v, str) or is_finite_number(v), "a finite number, 'yes' or 'no'"),
    "gold_inds": (lambda v: isinstance(v, dict), "an object"),
    "level": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a step count (integer)"),
    **{name: (lambda v: isinstance(v, str), "a string") for name in
       ("split", "source", "question", "context", "context_mode", "input_text", "target_program", "target_answer")},
}


def read_processed(path, required=("id", "prompt", *REWARD_FIELDS)) -> list[dict]:
    """The rows of a processed split (01_prepare_dataset.py's JSONL), checked by utils.runs.read_records:
    every row has the `required` fields and each field of _FIELD_TYPES it has holds its type (a NaN or
    infinite exe_ans is not a number); fields the pipeline does not know are kept. Raises
    FileNotFoundError when the file is missing, UsageError naming the file, the line and the field, with
    the fix, when it is empty, unreadable or a row is wrong."""
    rows = [row for _, row in runs.read_records(path, _FIELD_TYPES, PREPARE, required)]
    if not rows:
        raise DataError(f"{path} holds no examples: rerun python {PREPARE}")
    return rows
