"""Print a model's architecture and write a model config for it, with LoRA targets.

    python inspect_model_architecture.py --model smollm2-135m --no_config   # the default model
    python inspect_model_architecture.py --model models/SmolLM2-135M-Instruct --output /tmp/x.yaml
    python inspect_model_architecture.py --model Qwen/Qwen2.5-0.5B-Instruct  # -> configs/models/config_qwen2.5-0.5b-instruct.yaml
    python inspect_model_architecture.py --all                               # every model config whose model is here

--model takes a hub id, a local folder or a model config. Only the config is read and the model
is built on the meta device, so inspection needs no weights and takes seconds. The YAML written
is the default config (configs/models/smollm2-135m.yaml) with its model, lora and metadata
sections replaced; its training settings are the default's, tuned for a 135M model. --all prints
only: those models have configs already.
"""

import argparse
import collections
import datetime
import os
import re
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from utils import cli
from utils import config as config_lib
from utils.modeling import load_model_config, resolve_model_path

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / config_lib.DEFAULT_MODEL_CONFIG
ATTENTION_SCOPES = ("attn", "attention")
MLP_SCOPES = ("mlp", "feed_forward", "ffn")
# the architectures the config schema accepts (utils/config.py SCHEMA["model"]["architecture"])
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2", "qwen2": "qwen2"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()  # one of them is required: checked below, after typos
    which.add_argument("--model", help="hub id, local folder, or model config name/path")
    which.add_argument("--all", action="store_true",
                       help="inspect every configs/models/*.yaml whose model is available locally")
    parser.add_argument("--no_config", action="store_true", help="print only, write no YAML")
    parser.add_argument("--output", help="where the YAML goes "
                        "(default: configs/models/config_<name>.yaml)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise cli.UsageError(f"unknown flag {extra[0]}: this script takes --model, --all, --no_config and --output "
                             f"(see --help)")
    if not (args.model or args.all):
        raise cli.UsageError("pass --model ID_OR_PATH (a hub id, folder or config name) or --all")
    return args, extra


# --- inspection ---

def config_name(model: str) -> str:
    """'Qwen/Qwen2.5-0.5B-Instruct' -> 'qwen2.5-0.5b-instruct' (for file and model.name)."""
    base = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-")


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


def inspect(model_ref) -> dict:
    """Architecture facts of a model, from its config and a weightless (meta) instance."""
    hf_config = load_model_config(model_ref)
    with torch.device("meta"):  # shapes only: no memory, no init time, no weights needed
        model = AutoModelForCausalLM.from_config(hf_config)
    text_config = hf_config.get_text_config()

    linear_types, targets = collections.Counter(), collections.Counter()
    attention, mlp = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is model.get_output_embeddings():
            continue
        linear_types[type(module).__name__] += 1
        leaf = name.rsplit(".", 1)[-1]
        targets[leaf] += 1
        parents = name.lower().split(".")[:-1]  # e.g. model.layers.0.self_attn
        for group, scopes in ((attention, ATTENTION_SCOPES), (mlp, MLP_SCOPES)):
            if any(s in part for part in parents for s in scopes) and leaf not in group:
                group.append(leaf)

    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    heads = text_config.num_attention_heads
    return {
        "model_type": hf_config.model_type,
        "class": type(model).__name__,
        "hidden_size": text_config.hidden_size,
        "intermediate_size": (getattr(text_config, "intermediate_size", None)
                              or getattr(text_config, "n_inner", None)
                              or 4 * text_config.hidden_size),  # GPT-2's n_inner=None means 4x
        "layers": text_config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "vocab_size": text_config.vocab_size,
        "context_length": getattr(text_config, "max_position_embeddings", None),
        "parameters": sum(p.numel() for p in model.parameters()),  # tied weights count once
        "tied_embeddings": output_embeddings is not None
        and output_embeddings.weight is input_embeddings.weight,
        "linear_types": dict(linear_types),
        "linear_modules": dict(targets),
        "attention_targets": attention,
        "mlp_targets": mlp,
        "conv1d": "Conv1D" in linear_types,
    }


def report(model_ref, facts: dict) -> str:
    lines = [f"model: {model_ref}"]
    for key in ("model_type", "class", "hidden_size", "intermediate_size", "layers", "heads",
                "kv_heads", "vocab_size", "context_length", "tied_embeddings"):
        lines.append(f"  {key:18} {facts[key]}")
    lines.append(f"  {'parameters':18} {facts['parameters']:,} ({human_count(facts['parameters'])})")
    lines.append("  linear types       " + ", ".join(f"{k} x{v}" for k, v in facts["linear_types"].items()))
    lines.append("  linear modules     " + ", ".join(f"{k} x{v}" for k, v in facts["linear_modules"].items()))
    lines.append(f"  LoRA targets       attention: {facts['attention_targets']}  mlp: {facts['mlp_targets']}")
    if facts["conv1d"]:
        lines.append("  note               Conv1D layers (GPT-2 style): LoRA needs fan_in_fan_out: true")
    return "\n".join(lines)


# --- config ---

def build_config(model_ref: str, facts: dict) -> dict:
    """The default model YAML with model, lora and metadata describing this model."""
    with open(DEFAULT_CONFIG, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    name = config_name(model_ref)
    local = Path(model_ref).expanduser()
    if local.is_dir():  # a folder: keep it repo-relative when it is inside the repo
        local = local.resolve()
        name_or_path = str(local.relative_to(ROOT)) if local.is_relative_to(ROOT) else str(local)
        hub_id = name_or_path
    else:  # a hub id: download.sh --model puts it in models/<name>
        name_or_path, hub_id = f"models/{Path(model_ref).name}", model_ref
    default_lora = cfg["lora"]["target_modules"]
    # follow the default's choice of attention-only or attention + MLP
    with_mlp = any(t in {"gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2"} for t in default_lora)
    targets = facts["attention_targets"] + [t for t in facts["mlp_targets"] if with_mlp
                                            and t not in facts["attention_targets"]]
    cfg["model"].update({
        "name": name, "name_or_path": name_or_path, "hub_id": hub_id, "revision": None,
        "gguf_package": None, "gguf_file": None,  # GGUF packages only ship the default model
        "architecture": ARCHITECTURES.get(facts["model_type"], facts["model_type"]),
        "chat_template": None,
    })
    cfg["lora"].update({"target_modules": targets, "fan_in_fan_out": facts["conv1d"]})
    cfg["metadata"] = {
        "description": f"{name}: written by inspect_model_architecture.py --model {model_ref}",
        "family": facts["model_type"],
        "parameters": human_count(facts["parameters"]),
        "layers": facts["layers"], "hidden_size": facts["hidden_size"],
        "intermediate_size": facts["intermediate_size"], "heads": facts["heads"],
        "kv_heads": facts["kv_heads"], "vocab_size": facts["vocab_size"],
        "context_length": facts["context_length"], "tied_embeddings": facts["tied_embeddings"],
        "notes": "training, validation, generation and paths are copied from smollm2-135m.yaml; "
                 "tune them for this model's size",
    }
    return cfg


def write_config(cfg: dict, path: Path, model_ref: str):
    """Check the YAML with utils.config.load before it replaces anything."""
    header = (f"# Written by: python inspect_model_architecture.py --model {model_ref}\n"
              f"# on {datetime.date.today()}. Reasons for the copied settings: {DEFAULT_CONFIG.name}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.yaml")
    tmp.write_text(header + yaml.safe_dump(cfg, sort_keys=False, width=100), encoding="utf-8")
    try:
        config_lib.load(tmp)
    except config_lib.ConfigError as error:
        tmp.unlink()
        raise cli.JobFailed(f"the config for {model_ref} does not pass utils.config.load, so it was "
                            f"not written: {error}") from None
    os.replace(tmp, path)


def available_locally(config_path: Path) -> bool:
    """A config's model is here when its folder exists or its GGUF package is installed."""
    section = config_lib.load(config_path)["model"]
    if section.get("gguf_package"):
        import importlib.util

        return importlib.util.find_spec(section["gguf_package"]) is not None
    resolved = resolve_model_path(section)  # a folder when present, else the hub id
    return Path(resolved).is_dir()


# --- main ---

def main(args, extra_tokens=()) -> dict:
    """Returns the inspected facts (of the last model with --all)."""
    facts = {}
    if args.all:
        for path in sorted((ROOT / "configs" / "models").glob("*.yaml")):
            if path.name.startswith("config_"):
                continue  # written by this script: their models are inspected via --model
            if not available_locally(path):
                hub_id = config_lib.load(path)["model"]["hub_id"]
                print(f"skip {path.name}: model not available locally "
                      f"(bash download.sh --model {hub_id})\n")
                continue
            facts = inspect(path)
            print(report(path.name, facts) + "\n")
        return facts

    facts = inspect(args.model)
    print(report(args.model, facts))
    if args.no_config:
        return facts
    model_ref = args.model
    if config_lib.MODELS_DIR.joinpath(f"{model_ref}.yaml").is_file() or model_ref.endswith((".yaml", ".yml")):
        model_ref = resolve_model_path(model_ref)  # a config: describe the model it points to
    output = Path(args.output) if args.output else (
        ROOT / "configs" / "models" / f"config_{config_name(model_ref)}.yaml")
    write_config(build_config(model_ref, facts), output, model_ref)
    print(f"wrote {output} (check: python -c \"from utils import config; config.load('{output}')\")")
    return facts


if __name__ == "__main__":
    cli.run(main, parse_args)
