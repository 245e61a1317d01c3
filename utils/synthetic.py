"""Synthetic FinQA-format examples: a learnable, offline stand-in for smoke runs and tests.

Each example is a small company report in the official FinQA format: a table over three or four
years, pre_text/post_text sentences (one of them carries a non-table figure), and a question
whose gold program (one to three steps) comes from a template: change, percent change, ratio,
sum, average, growth in percent, greater, table_max/min/sum/average, unit conversion with a
constant and a compound-growth projection (exp). `qa.model_input` always holds the gold facts
(plus distractors), so the numbers a program needs are in the "retrieved" context.

`exe_ans` is what `utils.finqa_program.execute` returns for the gold program, never computed
here, and a template whose program does not execute is replaced by another.

A difficulty ladder (`levels`): a level is the number of steps of the gold program, and each level
draws from its own templates (LEVEL_TEMPLATES):
  1: one step: change, ratio, sum, product, in billions, table max/min/sum/average;
  2: two steps: percent change (both of FinQA's ways), average of two years, a sum in billions;
  3: three steps: growth in percent, compound-growth projection, the range of a table row
     (table_max - table_min), whether one year's change beat another's (`greater`).
The numbers always sit in the retrieved context among distractor facts. Without `levels` the
templates of every level mix (TEMPLATES), and every example records its `level` either way.

Example:
    splits = generate(100, seed=0)          # {"train": [...80], "dev": [...10], "test": [...10]}
    splits["train"][0]["qa"]["program"]      # e.g. "subtract(1384, 1212), divide(#0, 1212)"
    generate(100, seed=0, levels=(1,))       # one-step programs only
"""
from __future__ import annotations

import math
import random

from utils.data import format_number
from utils.finqa_program import execute

SPLITS = ("train", "dev", "test")  # FinQA's file names; 01_prepare_dataset maps dev -> val
_MAX_TEMPLATE_TRIES = 30

_NAME_HEADS = ("northwind", "bluestone", "harborview", "crestline", "silverleaf", "ironbridge",
               "lakeshore", "redwood", "summit", "pinecrest", "goldfield", "eastgate")
_NAME_TAILS = ("industries", "holdings", "corporation", "group", "technologies", "energy",
               "financial", "logistics", "retail", "systems")

# name: (cell style, low, high, decimals). "money" cells are "$ 1234", "plain" "1234",
# "percent" "12.5%"; values are in millions except percentages.
_TABLE_ROWS = {
    "revenue": ("money", 1000, 9999, 0),
    "net income": ("plain", 100, 999, 0),
    "operating expenses": ("plain", 500, 4999, 0),
    "total assets": ("money", 5000, 59999, 0),
    "cash and equivalents": ("plain", 200, 2999, 0),
    "capital expenditures": ("plain", 50, 800, 1),
    "operating margin": ("percent", 5, 30, 1),
    "effective tax rate": ("percent", 15, 35, 1),
}
_PERCENT_ROWS = [name for name, spec in _TABLE_ROWS.items() if spec[0] == "percent"]
_AMOUNT_ROWS = [name for name, spec in _TABLE_ROWS.items() if spec[0] != "percent"]
# Figures only the text mentions: (name, low, high, sentence with {company} {new} {y2} {old} {y1}).
_TEXT_FIGURES = (
    ("employees", 1000, 20000,
     "{company} had {new} employees at the end of {y2} , compared with {old} at the end of {y1} ."),
    ("stores", 100, 900,
     "{company} operated {new} stores at the end of {y2} , up from {old} stores in {y1} ."),
)
_FILLER = (
    "management believes these measures are useful to investors .",
    "results for the periods presented may not be indicative of future results .",
    "see note 4 for further information about our debt obligations .",
    "the company continues to evaluate opportunities to reduce costs .",
    "foreign currency movements did not have a material effect on the results .",
    "certain prior year amounts have been reclassified to conform to the current presentation .",
)


# --- formatting ----------------------------------------------------------------------------

def _number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[:-2] if text.endswith(".0") else text


def _cell(style: str, text: str) -> str:
    return {"money": f"$ {text}", "plain": text, "percent": f"{text}%"}[style]


def _arg(style: str, text: str) -> str:
    """A program argument as FinQA writes it: the number without "$"; percentages keep "%"."""
    return f"{text}%" if style == "percent" else text


def _answer(exe_ans, kind: str) -> str:
    """Answer text like FinQA's: "12.3%", "$ 512", "1.35", "yes"."""
    if kind == "yesno":
        return exe_ans
    if kind == "fraction_percent":
        return f"{exe_ans * 100:.1f}%"
    if kind == "percent_points":
        return f"{exe_ans:.1f}%"
    digits = 2 if abs(exe_ans) >= 1 else 3  # "0.681" (billions) keeps its meaning
    if kind == "money":
        return f"$ {format_number(round(exe_ans, digits))}"
    return format_number(round(exe_ans, digits))


def _value_kind(style: str) -> str:
    return {"money": "money", "plain": "plain", "percent": "fraction_percent"}[style]


# --- a report ------------------------------------------------------------------------------

class _Report:
    """One synthetic company report: table, text, and the series questions can use."""

    def __init__(self, rng: random.Random):
        self.company = f"{rng.choice(_NAME_HEADS)} {rng.choice(_NAME_TAILS)}"
        start = rng.randint(2012, 2020)
        self.years = [str(year) for year in range(start, start + rng.choice((3, 4)))]
        columns = self.years[::-1] if rng.random() < 0.5 else list(self.years)
        names = rng.sample(_AMOUNT_ROWS, rng.randint(3, 4)) + rng.sample(_PERCENT_ROWS, rng.randint(0, 1))
        rng.shuffle(names)

        # series[name] = {"style", "args": {year: arg}, "key": fact key, "years": [...]}
        self.series = {}
        self.table = [[""] + columns]
        self.facts = {}
        for row_index, name in enumerate(names, start=1):
            style, low, high, decimals = _TABLE_ROWS[name]
            level = rng.uniform(low, high)
            texts = {}
            for year in self.years:
                level = min(max(level * rng.uniform(0.8, 1.25), low), high * 1.5)
                texts[year] = _number(level, decimals if rng.random() < 0.8 else 1)
            self.table.append([name] + [_cell(style, texts[year]) for year in columns])
            self.facts[f"table_{row_index}"] = " ".join(
                f"the {name} of {year} is {_cell(style, texts[year])} ;" for year in columns)
            self.series[name] = {"style": style, "args": {y: _arg(style, t) for y, t in texts.items()},
                                 "key": f"table_{row_index}", "years": list(self.years), "row": True}

        figure, low, high, sentence = rng.choice(_TEXT_FIGURES)
        y1, y2 = self.years[-2], self.years[-1]
        old = rng.randint(low, high)
        new = round(old * rng.uniform(0.8, 1.25))
        new += 1 if new == old else 0
        figure_sentence = sentence.format(company=self.company, new=new, y2=y2, old=old, y1=y1)
        self.pre_text = [f"{self.company} annual report {y2} .",
                         f"{self.company} is a diversified company serving customers worldwide ."]
        self.post_text = rng.sample(_FILLER, 2)
        if rng.random() < 0.5:
            self.pre_text.append(figure_sentence)
        else:
            self.post_text.insert(rng.randint(0, 2), figure_sentence)
        self.pre_text.append("the following table summarizes selected financial data ( in millions ) :")
        sentences = self.pre_text + self.post_text
        text_key = f"text_{sentences.index(figure_sentence)}"
        for index, text in enumerate(sentences):
            self.facts.setdefault(f"text_{index}", text)
        self.series[f"number of {figure}"] = {"style": "plain", "args": {y1: str(old), y2: str(new)},
                                              "key": text_key, "years": [y1, y2], "row": False}

    def pick(self, rng, styles=("money", "plain", "percent"), rows_only=False):
        choices = [name for name, series in self.series.items()
                   if series["style"] in styles and (series["row"] or not rows_only)]
        return rng.choice(choices) if choices else None

    def two_years(self, rng, name):
        years = self.series[name]["years"]
        first = rng.randrange(len(years) - 1)
        second = first + 1 if rng.random() < 0.7 else rng.randrange(first + 1, len(years))
        return years[first], years[second]


# --- templates: (report, rng) -> (question, program, answer kind, fact keys) or None -------

_AMOUNTS = ("money", "plain")


def _change(report, rng):
    name = report.pick(rng)
    y1, y2 = report.two_years(rng, name)
    s = report.series[name]
    return (f"what was the change in {name} from {y1} to {y2}?",
            f"subtract({s['args'][y2]}, {s['args'][y1]})", _value_kind(s["style"]), [s["key"]])


def _percent_change(report, rng):
    name = report.pick(rng, _AMOUNTS)
    y1, y2 = report.two_years(rng, name)
    a = report.series[name]["args"]
    if rng.random() < 0.5:
        program = f"subtract({a[y2]}, {a[y1]}), divide(#0, {a[y1]})"
    else:  # FinQA writes this one both ways
        program = f"divide({a[y2]}, {a[y1]}), subtract(#0, const_1)"
    return (f"what was the percent change in {name} from {y1} to {y2}?", program,
            "fraction_percent", [report.series[name]["key"]])


def _growth_in_percent(report, rng):
    name = report.pick(rng, _AMOUNTS)
    y1, y2 = report.two_years(rng, name)
    a = report.series[name]["args"]
    return (f"what was the growth rate of {name} from {y1} to {y2} , in percent?",
            f"subtract({a[y2]}, {a[y1]}), divide(#0, {a[y1]}), multiply(#1, const_100)",
            "percent_points", [report.series[name]["key"]])


def _ratio(report, rng):
    first = report.pick(rng, _AMOUNTS, rows_only=True)
    second = rng.choice([n for n, s in report.series.items()
                         if s["row"] and s["style"] in _AMOUNTS and n != first])
    year = rng.choice(report.years)
    a, b = report.series[first], report.series[second]
    program = f"divide({a['args'][year]}, {b['args'][year]})"
    if rng.random() < 0.5:
        return (f"what was the ratio of {first} to {second} in {year}?", program, "ratio",
                [a["key"], b["key"]])
    return (f"what percentage of {second} did {first} represent in {year}?", program,
            "fraction_percent", [a["key"], b["key"]])


def _sum(report, rng):
    name = report.pick(rng, _AMOUNTS)
    y1, y2 = report.two_years(rng, name)
    s = report.series[name]
    return (f"what was the sum of {name} in {y1} and {y2}?",
            f"add({s['args'][y1]}, {s['args'][y2]})", _value_kind(s["style"]), [s["key"]])


def _average_of_two(report, rng):
    name = report.pick(rng)
    y1, y2 = report.two_years(rng, name)
    s = report.series[name]
    return (f"what was the average {name} for {y1} and {y2}?",
            f"add({s['args'][y1]}, {s['args'][y2]}), divide(#0, const_2)",
            _value_kind(s["style"]), [s["key"]])


def _greater(report, rng):
    name = report.pick(rng)
    y1, y2 = report.two_years(rng, name)
    a = report.series[name]["args"]
    return (f"was the {name} in {y2} greater than in {y1}?", f"greater({a[y2]}, {a[y1]})",
            "yesno", [report.series[name]["key"]])


def _table_extreme(report, rng):
    name = report.pick(rng, rows_only=True)
    op, word = rng.choice((("table_max", "highest"), ("table_min", "lowest")))
    s = report.series[name]
    return (f"what was the {word} {name} over the years shown?", f"{op}({name}, none)",
            _value_kind(s["style"]), [s["key"]])


def _table_total(report, rng):
    if rng.random() < 0.5:
        name = report.pick(rng, _AMOUNTS, rows_only=True)
        question, op = f"what was the sum of {name} over the years shown?", "table_sum"
    else:
        name = report.pick(rng, rows_only=True)
        question, op = f"what was the average {name} over the years shown?", "table_average"
    s = report.series[name]
    return question, f"{op}({name}, none)", _value_kind(s["style"]), [s["key"]]


def _product(report, rng):
    name = report.pick(rng, _AMOUNTS, rows_only=True)
    year = rng.choice(report.years)
    s = report.series[name]
    times = rng.choice((2, 3, 4, 5))
    return (f"if {name} in {year} were {times} times as large , what would it be?",
            f"multiply({s['args'][year]}, const_{times})", _value_kind(s["style"]), [s["key"]])


def _in_billions(report, rng):
    name = report.pick(rng, _AMOUNTS, rows_only=True)
    year = rng.choice(report.years)
    s = report.series[name]
    return (f"what was the {name} in {year} , in billions?",
            f"divide({s['args'][year]}, const_1000)", "plain", [s["key"]])


def _projection(report, rng):
    name = report.pick(rng, _AMOUNTS, rows_only=True)
    y1, y2 = report.years[-2], report.years[-1]
    a = report.series[name]["args"]
    return (f"if {name} kept growing at its {y1} to {y2} rate , what would it be two years "
            f"after {y2}?", f"divide({a[y2]}, {a[y1]}), exp(#0, const_2), multiply({a[y2]}, #1)",
            _value_kind(report.series[name]["style"]), [report.series[name]["key"]])


def _sum_in_billions(report, rng):
    name = report.pick(rng, _AMOUNTS, rows_only=True)
    y1, y2 = report.two_years(rng, name)
    a = report.series[name]["args"]
    return (f"what was the total {name} in {y1} and {y2} , in billions?",
            f"add({a[y1]}, {a[y2]}), divide(#0, const_1000)", "plain", [report.series[name]["key"]])


def _table_range(report, rng):
    name = report.pick(rng, rows_only=True)
    s = report.series[name]
    return (f"what was the difference between the highest and the lowest {name} over the years shown?",
            f"table_max({name}, none), table_min({name}, none), subtract(#0, #1)",
            _value_kind(s["style"]), [s["key"]])


def _greater_change(report, rng):
    name = report.pick(rng, _AMOUNTS, rows_only=True)
    years = report.series[name]["years"]
    if len(years) < 3:
        return None
    y1, y2, y3 = years[-3:]
    a = report.series[name]["args"]
    return (f"was the change in {name} from {y2} to {y3} greater than the change from {y1} to {y2}?",
            f"subtract({a[y3]}, {a[y2]}), subtract({a[y2]}, {a[y1]}), greater(#0, #1)", "yesno",
            [report.series[name]["key"]])


# The original mix, used when no levels are asked for (its examples record their step count as level).
TEMPLATES = (_change, _percent_change, _growth_in_percent, _ratio, _sum, _average_of_two,
             _greater, _table_extreme, _table_total, _in_billions, _projection)
# level -> templates whose gold programs have that many steps. The lone `greater` (one step, a yes/no
# coin flip for a model that has not learnt to compare) is left to the mix; level 3 compares changes.
LEVEL_TEMPLATES = {
    1: (_change, _ratio, _sum, _product, _in_billions, _table_extreme, _table_total),
    2: (_percent_change, _average_of_two, _sum_in_billions),
    3: (_growth_in_percent, _projection, _table_range, _greater_change),
}
LEVELS = tuple(LEVEL_TEMPLATES)


# --- examples ------------------------------------------------------------------------------

def _steps(program: str, table) -> list[dict]:
    """FinQA's qa.steps: op, args and the running result of each step."""
    steps, pieces = [], program.split("), ")
    for index, piece in enumerate(pieces):
        op, _, args = piece.rstrip(")").partition("(")
        arg1, _, arg2 = args.partition(", ")
        result = execute(", ".join(p if p.endswith(")") else p + ")" for p in pieces[:index + 1]), table)
        steps.append({"op": op, "arg1": arg1, "arg2": arg2,
                      "res": result if isinstance(result, str) else format_number(result)})
    return steps


def _nested(steps: list[dict]) -> str:
    """FinQA's qa.program_re: the program as one nested expression."""
    built = []
    for step in steps:
        args = [built[int(arg[1:])] if arg.startswith("#") else arg for arg in (step["arg1"], step["arg2"])]
        built.append(f"{step['op']}({args[0]}, {args[1]})")
    return built[-1]


def _model_input(report, gold_keys, rng) -> list[list[str]]:
    """Gold facts plus distractors up to FinQA's three, in document order."""
    keys = list(dict.fromkeys(gold_keys))
    others = [key for key in report.facts if key not in keys]
    keys += rng.sample(others, max(0, min(len(others), 3 - len(keys))))
    return [[key, report.facts[key]] for key in sorted(keys, key=lambda k: _position(k, report))]


def _position(key, report):
    kind, _, index = key.partition("_")
    if kind == "table":
        return 1, int(index)
    return (0, int(index)) if int(index) < len(report.pre_text) else (2, int(index))


def make_example(rng: random.Random, index: int, templates=TEMPLATES) -> dict:
    """One synthetic example in the official FinQA format, id "synthetic-{index:06d}", from one of
    `templates` (a level's, or the whole mix); qa.level is its gold program's number of steps."""
    report = _Report(rng)
    fallback = _change if _change in templates else templates[0]
    for attempt in range(_MAX_TEMPLATE_TRIES):
        # The whole mix's last try is a subtraction, which executes on any two numbers.
        template = rng.choice(templates) if attempt < _MAX_TEMPLATE_TRIES - 1 else fallback
        made = template(report, rng)
        if made is None:  # the template does not fit this report (too few years)
            continue
        question, program, kind, gold_keys = made
        exe_ans = execute(program, report.table)
        if exe_ans is None or (kind == "yesno") != isinstance(exe_ans, str):
            continue
        if isinstance(exe_ans, float) and not math.isfinite(exe_ans):
            continue
        break
    else:
        raise RuntimeError(f"synthetic example {index}: no template executed; this is a bug "
                           "in utils/synthetic.py")
    steps = _steps(program, report.table)
    gold_keys = list(dict.fromkeys(gold_keys))
    table_rows = sorted(int(k.split("_")[1]) for k in gold_keys if k.startswith("table_"))
    text_rows = sorted(int(k.split("_")[1]) for k in gold_keys if k.startswith("text_"))
    return {
        "pre_text": report.pre_text,
        "post_text": report.post_text,
        "filename": f"synthetic/{report.company.replace(' ', '_')}/{report.years[-1]}.pdf",
        "table_ori": [list(row) for row in report.table],
        "table": report.table,
        "id": f"synthetic-{index:06d}",
        "table_retrieved": [], "text_retrieved": [],
        "table_retrieved_all": [], "text_retrieved_all": [],
        "qa": {
            "question": question,
            "answer": _answer(exe_ans, kind),
            "explanation": "",
            "ann_table_rows": table_rows,
            "ann_text_rows": text_rows,
            "steps": steps,
            "program": program,
            "gold_inds": {key: report.facts[key] for key in sorted(gold_keys, key=lambda k: _position(k, report))},
            "exe_ans": exe_ans,
            "tfidftopn": {},
            "program_re": _nested(steps),
            "model_input": _model_input(report, gold_keys, rng),
            "level": len(steps),
        },
    }


def generate(num_examples: int, seed: int, split_fractions=(0.8, 0.1, 0.1), levels=None
             ) -> dict[str, list[dict]]:
    """Deterministic synthetic FinQA-format examples per split.

    Args:
        num_examples: examples over all splits.
        seed: the only source of randomness (random.Random(seed)); same seed, same output.
        split_fractions: shares of (train, dev, test), summing to 1.
        levels: difficulty levels to draw from (LEVELS: 1, 2, 3 steps), in equal shares, each
            example's level drawn at random; None: the whole template mix (TEMPLATES).
    Returns:
        {"train": [...], "dev": [...], "test": [...]}, ids "synthetic-000000" onwards.
    """
    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) \
            or not math.isclose(sum(split_fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be three non-negative shares of (train, dev, test) "
                         f"summing to 1, got {tuple(split_fractions)!r}")
    if levels is not None and (not levels or any(level not in LEVEL_TEMPLATES for level in levels)):
        raise ValueError(f"levels must be some of {LEVELS}, got {levels!r}")
    rng = random.Random(seed)
    pools = [LEVEL_TEMPLATES[level] for level in sorted(set(levels))] if levels else [TEMPLATES]
    examples = [make_example(rng, index, rng.choice(pools) if len(pools) > 1 else pools[0])
                for index in range(num_examples)]
    num_train = round(num_examples * split_fractions[0])
    num_dev = min(round(num_examples * split_fractions[1]), num_examples - num_train)
    return {"train": examples[:num_train], "dev": examples[num_train:num_train + num_dev],
            "test": examples[num_train + num_dev:]}
