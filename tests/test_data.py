"""utils/data.py: context modes on real FinQA examples, prompts, canonical responses, loading."""
import json
from pathlib import Path

import pytest

from utils.data import (CONTEXT_MODES, PROCESSED_FIELDS, SYSTEM_PROMPT, DataError, answer_text,
                        build_context, build_prompt, canonical_response, count_prompt_tokens,
                        format_number, load_finqa_split, to_processed, validate_example)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "finqa-sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / "train.json").is_file(),
                                  reason=f"FinQA sample not found at {SAMPLE}")


class WordTokenizer:
    """One token per whitespace-separated word: enough to test budgets without a model."""
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return text.split()


@pytest.fixture(scope="module")
def sample():
    return load_finqa_split(SAMPLE / "train.json")


@pytest.fixture(scope="module")
def example(sample):
    # ETR/2009/page_107.pdf-2: 'divide(114400, 329500)', facts text_8, table_4, table_5
    return sample[0]


# --- context modes ---

@needs_sample
def test_retrieved_context_is_model_input(example):
    context = build_context(example, "retrieved")
    assert context.splitlines() == [text for _key, text in example["qa"]["model_input"]]


@needs_sample
def test_gold_context_holds_gold_facts_in_document_order(example):
    context = build_context(example, "gold")
    gold = example["qa"]["gold_inds"]
    # text_8 is in pre_text, so it comes before the table rows
    assert context.splitlines() == [gold["text_8"], gold["table_4"], gold["table_5"]]
    row = to_processed(example, "train", "gold")
    assert row["context_mode"] == "gold"  # the oracle is labelled in every row


@needs_sample
def test_gold_facts_after_the_table_come_from_post_text(sample):
    for raw in sample:
        gold = raw["qa"]["gold_inds"]
        post_keys = [k for k in gold if k.startswith("text_") and int(k[5:]) >= len(raw["pre_text"])]
        if post_keys and any(k.startswith("table_") for k in gold):
            lines = build_context(raw, "gold").splitlines()
            assert lines[-1] == gold[max(post_keys, key=lambda k: int(k[5:]))]
            return
    pytest.skip("no sample example with both a table fact and a post_text fact")


@needs_sample
def test_full_context_renders_document(example):
    context = build_context(example, "full")
    lines = context.splitlines()
    assert lines[0] == example["pre_text"][0]
    assert "tranche a-3 ( 5.93% ( 5.93 % ) ) due june 2022 | 114400" in lines
    assert lines[-1] == example["post_text"][-1]


@needs_sample
@pytest.mark.parametrize("budget", [100000, 600, 200, 1])  # whole, cut, table only, nothing
def test_full_context_fits_budget_and_keeps_question(example, budget):
    tokenizer = WordTokenizer()
    question = example["qa"]["question"]
    context = build_context(example, "full", tokenizer, budget)
    prompt = build_prompt(question, context)
    assert prompt[1]["content"].endswith(f"Question: {question}")
    base = count_prompt_tokens(build_prompt(question, ""), tokenizer)
    if budget >= base:
        assert count_prompt_tokens(prompt, tokenizer) <= budget
    else:
        assert context == ""  # the question alone is over budget: no context, question whole


@needs_sample
def test_full_context_drops_text_before_table(example):
    tokenizer = WordTokenizer()
    table_lines = [" | ".join(row).strip() for row in example["table"]]
    base = count_prompt_tokens(build_prompt(example["qa"]["question"], ""), tokenizer)
    budget = base + sum(len(line.split()) for line in table_lines) + 5
    context = build_context(example, "full", tokenizer, budget)
    lines = context.splitlines()
    kept_pre = lines[:-len(table_lines)]
    assert lines[-len(table_lines):] == table_lines   # post_text went first, the table stays
    assert kept_pre == example["pre_text"][:len(kept_pre)] and len(kept_pre) < len(example["pre_text"])


@needs_sample
def test_full_context_with_a_real_chat_tokenizer(example, tmp_path_factory):
    from transformers import AutoTokenizer
    from tests.fixtures.tiny_model import build_tiny_model
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    question = example["qa"]["question"]
    base = count_prompt_tokens(build_prompt(question, ""), tokenizer)
    context = build_context(example, "full", tokenizer, base + 60)
    assert 0 < count_prompt_tokens(build_prompt(question, context), tokenizer) <= base + 60
    assert build_context(example, "full", tokenizer, 5) == ""


@needs_sample
def test_unknown_mode_names_valid_modes(example):
    with pytest.raises(ValueError, match="retrieved, gold, full"):
        build_context(example, "oracle")


def test_full_mode_budget_needs_tokenizer():
    raw = {"pre_text": ["a"], "post_text": [], "table": [["x", "1"]], "qa": {"question": "q"}}
    with pytest.raises(ValueError, match="tokenizer"):
        build_context(raw, "full", None, 100)


# --- prompt, response, processed rows ---

def test_canonical_response_round_trips():
    text = canonical_response("subtract(5829, 5735), divide(#0, 5735)", "1.6%")
    assert text == '{"program": "subtract(5829, 5735), divide(#0, 5735)", "answer": "1.6%"}'
    assert json.loads(text) == {"program": "subtract(5829, 5735), divide(#0, 5735)", "answer": "1.6%"}


def test_prompt_layout():
    messages = build_prompt("what is x?", "fact one\nfact two")
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": "Context:\nfact one\nfact two\n\nQuestion: what is x?"}]


@needs_sample
@pytest.mark.parametrize("mode", CONTEXT_MODES)
def test_processed_row_fields(example, mode):
    row = to_processed(example, "train", mode)
    assert tuple(row) == PROCESSED_FIELDS
    assert row["completion"] == [{"role": "assistant",
                                  "content": canonical_response("divide(114400, 329500)", "34.7%")}]
    assert row["input_text"] == SYSTEM_PROMPT + "\n\n" + row["prompt"][1]["content"]
    assert (row["exe_ans"], row["target_answer"], row["source"]) == (0.34719, "34.7%", "finqa")
    assert row["table"] == example["table"] and row["gold_inds"] == example["qa"]["gold_inds"]
    json.dumps(row)  # one JSONL line


@pytest.mark.parametrize("qa, expected", [
    ({"answer": "34.7%", "exe_ans": 0.34719}, "34.7%"),   # FinQA's text wins
    ({"answer": "", "exe_ans": 1393.0}, "1393"),          # empty (dev AWK/2013/page_132.pdf-4)
    ({"answer": " ", "exe_ans": 0.5}, "0.5"),
    ({"answer": "", "exe_ans": "yes"}, "yes"),
])
def test_answer_text(qa, expected):
    assert answer_text(qa) == expected


@pytest.mark.parametrize("value, expected", [
    (1393.0, "1393"),
    (0.347191, "0.34719"),    # 5 decimals, as the scorer rounds
    (-2.5, "-2.5"),
    (-0.000001, "0"),         # no "-0"
])
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_to_processed_rejects_missing_program():
    raw = {"id": "x-1", "pre_text": [], "post_text": [], "table": [],
           "qa": {"question": "q?", "program": "", "model_input": []}}
    with pytest.raises(DataError, match="x-1.*qa.program"):
        to_processed(raw, "train", "retrieved")


# --- validation ---

def _good():
    return {"id": "a-1", "pre_text": ["p"], "post_text": [], "table": [["", "2020"], ["revenue", "5"]],
            "qa": {"question": "q?", "program": "add(1, 2)", "answer": "3", "exe_ans": 3.0,
                   "gold_inds": {"table_1": "the revenue of 2020 is 5 ;"},
                   "model_input": [["table_1", "the revenue of 2020 is 5 ;"]]}}


def _broken(change):
    raw = _good()
    change(raw)
    return raw


@pytest.mark.parametrize("raw, expected", [
    (_good(), []),                                                                    # fine
    (_broken(lambda r: r["qa"].update(program="")), ["qa.program: missing or empty"]),
    (_broken(lambda r: r["qa"].pop("question")), ["qa.question: missing or empty"]),
    (_broken(lambda r: r.update(table=[["a", 1]])), ["table: missing or not a list of rows of strings"]),
    (_broken(lambda r: r["table"].append(["x"])), ["note: table rows have different lengths [1, 2]"]),
    (_broken(lambda r: r["qa"].update(exe_ans=None)), ["qa.exe_ans: should be a number, 'yes' or 'no', found None"]),
    (_broken(lambda r: r["qa"].update(gold_inds={"row_1": "x"})),
     ["qa.gold_inds: missing or not a {'text_N'|'table_N': str} object"]),
    (_broken(lambda r: r.pop("qa")), ["qa: missing or not an object"]),
    ([1, 2], ["example is a list, not an object"]),
])
def test_validate_example(raw, expected):
    assert validate_example(raw) == expected


@needs_sample
def test_sample_examples_are_valid(sample):
    assert [validate_example(raw) for raw in sample] == [[]] * len(sample)


# --- loading ---

def test_load_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as caught:
        load_finqa_split(tmp_path / "dev.json")
    assert isinstance(caught.value, FileNotFoundError)
    assert "dev.json" in str(caught.value) and "bash download.sh" in str(caught.value)


def test_load_corrupt_file_names_file_and_position(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"id": 1},\n  {"id": \n')
    with pytest.raises(DataError, match=r"train\.json is not valid JSON \(line 4, column 1"):
        load_finqa_split(path)


def test_load_rejects_non_list(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('{"id": 1}')
    with pytest.raises(DataError, match=r"test\.json should hold a JSON list"):
        load_finqa_split(path)
