"""Configs: model YAML < algorithm YAML < command line, checked against one schema.

    python 06_train_grpo.py --config qwen2.5-0.5b --algo_config grpo --training.learning_rate 5e-6 --epochs 1

    cfg = load("smollm2-135m", "grpo", ["--algorithm.beta", "0.02", "--batch_size=8"])
    cfg["training"]["per_device_train_batch_size"]  # -> 8

`SCHEMA` (model sections) and `ALGORITHM_SCHEMA` (one entry per method, under the `algorithm:`
section) list every known key with its type; nothing else is accepted. Every non-Optional key
must be set by the YAML files; a missing Optional key reads as None. An algorithm YAML holds an
`algorithm:` section and may also override model sections (RL wants other learning rates than
SFT). Config names resolve against the repository, so scripts work from any directory.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from utils.cli import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "configs" / "models"
ALGORITHMS_DIR = REPO_ROOT / "configs" / "algorithms"
DEFAULT_MODEL_CONFIG = "configs/models/smollm2-135m.yaml"


class ConfigError(UsageError):
    """A config file, key, value or flag is wrong; the message names it and the fix."""


# --- schema ---
# The single source of truth for known keys: section -> key -> type. Optional[...] allows null.
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        "name": str,                      # short name used in outputs and reports
        "name_or_path": str,              # local folder (relative to the working directory) or hub id
        "hub_id": str,                    # where the weights come from (download.sh --model)
        "revision": Optional[str],        # hub branch, tag or commit; null = main
        "gguf_package": Optional[str],    # Python package that ships a GGUF file (setup.sh)
        "gguf_file": Optional[str],       # file name inside gguf_package
        "architecture": Literal["llama", "gpt2", "qwen2"],
        "dtype": Literal["auto", "float32", "bfloat16", "float16"],
        "trust_remote_code": bool,
        "attn_implementation": Optional[str],  # null = transformers' default (sdpa)
        "chat_template": Optional[str],   # Jinja template for tokenizers without one
        "max_length": int,                # prompt + completion token budget
    },
    "lora": {
        "enabled": bool,
        "r": int,
        "alpha": int,
        "dropout": float,
        "target_modules": list[str],
        "bias": Literal["none", "all", "lora_only"],
        "task_type": str,
        "fan_in_fan_out": bool,           # true for GPT-2's Conv1D layers
    },
    "training": {
        "learning_rate": float,
        "num_train_epochs": float,
        "max_steps": int,                 # -1 = run num_train_epochs
        "per_device_train_batch_size": int,
        "per_device_eval_batch_size": int,
        "gradient_accumulation_steps": int,
        "warmup_ratio": float,
        "weight_decay": float,
        "lr_scheduler_type": str,
        "max_grad_norm": float,
        "gradient_checkpointing": bool,
        "optim": str,
        "logging_steps": int,
        "save_steps": int,
        "save_total_limit": Optional[int],
        "seed": int,
        "max_prompt_tokens": int,
        "report_to": str,                 # none | tensorboard | wandb ...
    },
    "validation": {
        "eval_steps": int,
        "num_samples": int,               # val examples generated at each validation
        "max_new_tokens": int,
        "batch_size": int,
    },
    "generation": {
        "max_new_tokens": int,
        "temperature": float,
        "top_p": float,
        "num_candidates": int,
        "batch_size": int,
        "do_sample": bool,
    },
    "paths": {
        "data_dir": str,
        "output_root": str,
        "output_dir": Optional[str],
        "models_dir": str,
    },
    "metadata": {
        "description": str,
        "family": str,
        "parameters": str,                # e.g. "135M"
        "layers": Optional[int],
        "hidden_size": Optional[int],
        "intermediate_size": Optional[int],
        "heads": Optional[int],
        "kv_heads": Optional[int],
        "vocab_size": Optional[int],
        "context_length": Optional[int],
        "tied_embeddings": Optional[bool],
        "notes": Optional[str],
    },
}

# The `algorithm:` section: its keys depend on `algorithm.name`.
_VLLM = {
    "use_vllm": bool,
    "vllm_mode": Literal["colocate", "server"],
    "vllm_gpu_memory_utilization": float,
    "vllm_allow_half_precision_merge": bool,
}
ALGORITHM_SCHEMA: dict[str, dict[str, Any]] = {
    "ppo": {
        "name": Literal["ppo"],
        "clip_range": float,
        "clip_range_value": float,
        "kl_coef": float,
        "adaptive_kl": bool,
        "target_kl": float,
        "kl_horizon": int,
        "ppo_epochs": int,
        "num_mini_batches": int,
        "rollout_batch_size": int,
        "gamma": float,
        "lam": float,
        "vf_coef": float,
        "entropy_coef": float,
        "whiten_rewards": bool,
        "reward_clip": float,
        "normalize_rewards": bool,
        "max_approx_kl": float,
        "temperature": float,
        "top_p": float,
    },
    "grpo": {
        "name": Literal["grpo"],
        "num_generations": int,
        "beta": float,
        "loss_type": Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"],
        "epsilon": float,
        "scale_rewards": Literal["group", "batch", "none"],
        "num_iterations": int,
        "temperature": float,
        "top_p": float,
        **_VLLM,
    },
    "rloo": {
        "name": Literal["rloo"],
        "num_generations": int,
        "baseline": Literal["loo"],
        "beta": float,
        "normalize_advantages": bool,
        "temperature": float,
        "top_p": float,
        **_VLLM,
    },
    "dpo": {
        "name": Literal["dpo"],
        "beta": float,
        "loss_type": Literal["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"],
        "label_smoothing": float,
        "min_margin": float,
        "holdout_fraction": float,
    },
}

# Short flags for the values researchers change most.
SHORTCUTS = {
    "batch_size": "training.per_device_train_batch_size",
    "epochs": "training.num_train_epochs",
    "learning_rate": "training.learning_rate",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "max_steps": "training.max_steps",
    "seed": "training.seed",
    "output_dir": "paths.output_dir",
}

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


# --- types ---
class _Mismatch(Exception):
    """Internal: a value does not fit its type (turned into a ConfigError with a location)."""


def _is_optional(typ) -> bool:
    return typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ)


def _inner(typ):
    """The type inside Optional[...] (or the type itself)."""
    if _is_optional(typ):
        return next(t for t in typing.get_args(typ) if t is not type(None))
    return typ


def type_name(typ) -> str:
    """Human-readable type for error messages and help text."""
    if _is_optional(typ):
        return f"{type_name(_inner(typ))} or null"
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(typ))
    if typing.get_origin(typ) is list:
        return f"list of {type_name(typing.get_args(typ)[0])}"
    return {float: "number", int: "integer", bool: "true/false", str: "text"}.get(typ, str(typ))


def _check(value, typ):
    """Return value if it fits typ (ints widen to float), else raise _Mismatch."""
    if value is None:
        if _is_optional(typ):
            return None
        raise _Mismatch("null is not allowed here")
    typ = _inner(typ)
    origin = typing.get_origin(typ)
    if origin is Literal:
        if value in typing.get_args(typ):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, typing.get_args(typ)[0]) for v in value]
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan and .inf: no setting means them
                raise _Mismatch(f"expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str) and "e" in value.lower() and _looks_numeric(value):
            raise _Mismatch(f"got the text {value!r}: PyYAML reads a number with an exponent as "
                            f"text unless it has a dot and a signed exponent; "
                            f"write it as {_yaml_float_hint(value)}")
    elif typ is str:
        if isinstance(value, str):
            return value
    raise _Mismatch(f"expected {type_name(typ)}, got {value!r} ({type(value).__name__})")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _yaml_float_hint(text: str) -> str:
    """PyYAML (YAML 1.1) reads a float only with a dot and a signed exponent: 2e-4 -> 2.0e-4."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if not exponent:
        return text
    mantissa = mantissa if "." in mantissa else mantissa + ".0"
    return f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"


def _parse_text(text: str, typ, flag: str):
    """Type a command-line value from the schema."""
    if _is_optional(typ) and text.strip().lower() in ("null", "none"):
        return None
    typ = _inner(typ)
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            elem = typing.get_args(typ)[0]
            if text.strip().startswith("["):
                return _check(json.loads(text), typ)
            return [_parse_text(part.strip(), elem, flag) for part in text.split(",") if part.strip()]
        if typ is bool:
            if text.strip().lower() in _TRUE | _FALSE:
                return text.strip().lower() in _TRUE
            raise _Mismatch("expected true/false (also 1/0, yes/no)")
        if typ is int:
            return int(text)
        if typ is float:
            return _check(float(text), float)  # finite
        return _check(text, typ)
    except (ValueError, _Mismatch) as err:  # json.JSONDecodeError is a ValueError
        detail = str(err) if isinstance(err, _Mismatch) else f"expected {type_name(typ)}"
        raise ConfigError(f"{flag}: cannot use {text!r}: {detail}") from None


# --- keys ---
def _section_schema(section: str, algorithm: str | None) -> dict[str, Any] | None:
    if section == "algorithm":
        return ALGORITHM_SCHEMA.get(algorithm) if algorithm else None
    return SCHEMA.get(section)


def known_keys(algorithm: str | None = None) -> list[str]:
    """Every dotted key (section.key) valid for the given algorithm (or none)."""
    keys = [f"{s}.{k}" for s, fields in SCHEMA.items() for k in fields]
    if algorithm in ALGORITHM_SCHEMA:
        keys += [f"algorithm.{k}" for k in ALGORITHM_SCHEMA[algorithm]]
    return keys


def _suggest(name: str, algorithm: str | None, prefix: str = "") -> str:
    """' (did you mean: ...?)' from close matches over dotted keys and shortcut names.

    Leaf names are compared (a shared "training." prefix would make every training key look
    close), keys of the same section first; whole dotted names catch misspelled sections.
    """
    keys = known_keys(algorithm)
    section, _, leaf = name.rpartition(".")
    by_leaf: dict[str, list[str]] = {shortcut: [shortcut] for shortcut in SHORTCUTS}
    for key in keys:
        by_leaf.setdefault(key.rpartition(".")[2], []).append(key)
    matches = []
    for close in difflib.get_close_matches(leaf, list(by_leaf), n=4, cutoff=0.7):
        matches += sorted(by_leaf[close], key=lambda key: not key.startswith(f"{section}."))
    matches += difflib.get_close_matches(name, keys, n=2, cutoff=0.85)
    matches = [m for m in dict.fromkeys(matches) if m != name][:4]
    if matches:
        return " (did you mean: " + ", ".join(prefix + m for m in matches) + "?)"
    in_section = [prefix + key for key in keys if key.startswith(f"{section}.")]
    if in_section:
        return f" (known keys in {section}: {', '.join(in_section)})"
    return " (the known keys are listed in SCHEMA in utils/config.py)"


# --- files ---
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def resolve_config_path(name_or_path: str | Path, folder: Path) -> Path:
    """A path (as given, or relative to the repo root) or a bare name looked up in folder."""
    given = Path(name_or_path)
    candidates = [given, REPO_ROOT / given, folder / given, folder / f"{given}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found (looked for {given} and "
                      f"{folder / given.name}.yaml); available in {folder}: {', '.join(available)}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(f"{path}: invalid YAML: nested too deeply to read") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, lora:, ...), "
                          f"got {type(data).__name__}")
    return data


def _merge_file(cfg: dict, data: dict, path: Path, allowed: list[str]) -> None:
    """Check one YAML file's sections and keys, then merge it into cfg."""
    algo_section = data.get("algorithm")
    algorithm = algo_section.get("name") if isinstance(algo_section, dict) else None
    if "algorithm" in allowed and algorithm not in ALGORITHM_SCHEMA:
        raise ConfigError(f"{path}: algorithm.name must be one of {', '.join(ALGORITHM_SCHEMA)}, "
                          f"got {algorithm!r}")
    for section, values in data.items():
        if section not in allowed:
            close = difflib.get_close_matches(str(section), allowed, n=2, cutoff=0.6)
            hint = (" (the algorithm section belongs in configs/algorithms/*.yaml)" if section == "algorithm"
                    else f" (did you mean: {', '.join(close)}?)" if close else "")
            raise ConfigError(f"{path}: unknown section {section!r}{hint}; "
                              f"sections here: {', '.join(allowed)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of key: value")
        fields = _section_schema(section, algorithm)
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(f"{path}: unknown key {dotted!r}{_suggest(dotted, algorithm)}")
            try:
                cfg.setdefault(section, {})[key] = _check(value, fields[key])
            except _Mismatch as err:
                raise ConfigError(f"{path}: {dotted}: {err}") from None


def _complete(cfg: dict, sources: str) -> None:
    """Require every non-Optional key; fill missing Optional keys with None."""
    sections = {s: SCHEMA[s] for s in SCHEMA}
    if "algorithm" in cfg:
        sections["algorithm"] = ALGORITHM_SCHEMA[cfg["algorithm"]["name"]]
    missing = []
    for section, fields in sections.items():
        values = cfg.setdefault(section, {})
        for key, typ in fields.items():
            if key not in values:
                if _is_optional(typ):
                    values[key] = None
                else:
                    missing.append(f"{section}.{key}")
    if missing:
        raise ConfigError(f"{sources}: missing required keys: {', '.join(missing)} "
                          f"(copy them from {MODELS_DIR / 'smollm2-135m.yaml'} or configs/algorithms/)")


# --- overrides ---
def parse_overrides(tokens, algorithm: str | None = None) -> list[tuple[str, str, Any]]:
    """Turn ['--training.learning_rate', '1e-5', '--epochs=2'] into (flag, dotted_key, typed value)."""
    tokens = list(tokens)
    parsed, i = [], 0
    while i < len(tokens):
        token = str(tokens[i])
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.key value")
        flag, has_value, value = token.partition("=")
        if not has_value:
            if i + 1 >= len(tokens) or str(tokens[i + 1]).startswith("--"):
                raise ConfigError(f"{flag} needs a value (--section.key value or --section.key=value)")
            value, i = str(tokens[i + 1]), i + 1
        i += 1
        name = flag[2:]
        dotted = SHORTCUTS.get(name) or _algorithm_flag(name, flag, algorithm) or name
        section, _, key = dotted.partition(".")
        if section == "algorithm" and algorithm is None:
            raise ConfigError(f"{flag}: no algorithm config is loaded; pass --algo_config first")
        fields = _section_schema(section, algorithm) or {}
        if key not in fields:
            raise ConfigError(f"unknown flag {flag}{_suggest(name, algorithm, prefix='--')}")
        if dotted == "algorithm.name":
            raise ConfigError(f"{flag}: the algorithm is chosen by --algo_config, not overridden")
        parsed.append((flag, dotted, _parse_text(value, fields[key], flag)))
    return parsed


def _algorithm_flag(name: str, flag: str, algorithm: str | None) -> str | None:
    """A plain algorithm key as a flag (--clip_range = --algorithm.clip_range), as the seed documents
    them; None when `name` is no key of the algorithm's section. A key that a model section has
    too (temperature, top_p) is ambiguous: the error names both dotted forms."""
    if "." in name or algorithm not in ALGORITHM_SCHEMA or name not in ALGORITHM_SCHEMA[algorithm]:
        return None
    shared = [f"--{section}.{name}" for section, fields in SCHEMA.items() if name in fields]
    if shared:
        raise ConfigError(f"{flag} is ambiguous: it is a key of the algorithm section and of "
                          f"{', '.join(s[2:].partition('.')[0] for s in shared)}; write --algorithm.{name} "
                          f"or {' or '.join(shared)}")
    return f"algorithm.{name}"


# --- public API ---
def load(model_config: str | Path = DEFAULT_MODEL_CONFIG, algo_config: str | Path | None = None,
         overrides=()) -> dict:
    """Resolve model YAML < algorithm YAML < command-line overrides into one checked plain dict.

    Args:
        model_config: path to a model YAML or a bare name (``smollm2-135m``) in configs/models/.
        algo_config: optional path or bare name (``grpo``) in configs/algorithms/.
        overrides: command-line tokens, e.g. ``["--training.learning_rate", "1e-5", "--epochs=2"]``.
    Returns:
        {"model": {...}, "lora": {...}, ..., "metadata": {...}} plus "algorithm" when algo_config.
    Raises:
        ConfigError naming the file or flag, the key and close matches.
    """
    cfg: dict = {}
    model_path = resolve_config_path(model_config, MODELS_DIR)
    _merge_file(cfg, _read_yaml(model_path), model_path, list(SCHEMA))
    sources = str(model_path)
    if algo_config is not None:
        algo_path = resolve_config_path(algo_config, ALGORITHMS_DIR)
        data = _read_yaml(algo_path)
        if not isinstance(data.get("algorithm"), dict):
            raise ConfigError(f"{algo_path}: an algorithm config needs an 'algorithm:' section with a name")
        _merge_file(cfg, data, algo_path, ["algorithm", *SCHEMA])
        sources += f" + {algo_path}"
    _complete(cfg, sources)
    algorithm = cfg.get("algorithm", {}).get("name")
    for _flag, dotted, value in parse_overrides(overrides, algorithm):
        section, _, key = dotted.partition(".")
        cfg[section][key] = value
    return cfg


def add_common_args(parser: argparse.ArgumentParser, algo: str | None = None) -> argparse.ArgumentParser:
    """Add --config, --seed, --run_id, --output_dir (+ --algo_config when algo) and the shortcuts."""
    parser.allow_abbrev = False  # a typo like --learning must reach the override check, not match a flag
    parser.add_argument("--config", default=DEFAULT_MODEL_CONFIG,
                        help="model config: a YAML path or a name in configs/models/ "
                             "(e.g. smollm2-135m, qwen2.5-0.5b) (default: %(default)s)")
    if algo:
        parser.add_argument("--algo_config", default=f"configs/algorithms/{algo}.yaml",
                            help="algorithm config: a YAML path or a name in configs/algorithms/ "
                                 "(default: %(default)s)")
        parser.set_defaults(algorithm=algo)
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: the config's training.seed)")
    parser.add_argument("--run_id", default="run_001",
                        help="run folder under outputs/ (letters, digits, _ and -) (default: %(default)s)")
    parser.add_argument("--output_dir", default=None,
                        help="write here instead of outputs/<run_id>/<module>/ (= --paths.output_dir)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="shortcut for --training.per_device_train_batch_size")
    parser.add_argument("--epochs", type=float, default=None, help="shortcut for --training.num_train_epochs")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="shortcut for --training.learning_rate")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None,
                        help="shortcut for --training.gradient_accumulation_steps")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="shortcut for --training.max_steps (-1 = run the epochs)")
    note = ("Any config value can be overridden with --section.key value (or --section.key=value), "
            "e.g. --training.learning_rate 1e-5 --lora.r 8 --lora.target_modules q_proj,v_proj; "
            "unknown keys are an error that names the close matches.")
    if algo:
        plain = [f"--{key}" for key in ALGORITHM_SCHEMA[algo] if key != "name"
                 and not any(key in fields for fields in SCHEMA.values())]
        note += (f"\n\nEvery key of configs/algorithms/{algo}.yaml is also a plain flag: "
                 f"{', '.join(plain)} (= --algorithm.KEY). Keys that a model section shares "
                 f"(temperature, top_p) need the dotted form, e.g. --algorithm.temperature 0.7.")
    parser.epilog = f"{parser.epilog}\n\n{note}" if parser.epilog else note
    return parser


def from_args(args: argparse.Namespace, extra_tokens=(), quick_test: dict | None = None) -> dict:
    """Load the config named by parsed args (from parser.parse_known_args()).

    Precedence, lowest first: model YAML, algorithm YAML, `quick_test` ({"section.key": value},
    a script's --quick_test settings, when args.quick_test is set), shortcut flags that are set
    (--seed into training.seed, --output_dir into paths.output_dir), the unparsed extra tokens.
    """
    tokens = [token for key, value in (quick_test or {}).items() if getattr(args, "quick_test", False)
              for token in (f"--{key}", str(value))]
    for name in SHORTCUTS:
        value = getattr(args, name, None)
        if value is not None:
            tokens += [f"--{name}", str(value)]
    tokens += list(extra_tokens)
    cfg = load(getattr(args, "config", DEFAULT_MODEL_CONFIG), getattr(args, "algo_config", None), tokens)
    expected = getattr(args, "algorithm", None)
    if expected and cfg.get("algorithm", {}).get("name") != expected:
        raise ConfigError(f"--algo_config {args.algo_config} is a {cfg.get('algorithm', {}).get('name')!r} "
                          f"config, but this script runs {expected!r}")
    return cfg


def dump(cfg: dict) -> str:
    """The resolved config as YAML text (for logs, manifests and checkpoints)."""
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
