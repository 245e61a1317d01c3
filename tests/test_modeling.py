"""utils.modeling (tiny models built here, no network) and inspect_model_architecture.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.fixtures.tiny_model import build_tiny_model
from utils import config as config_lib
from utils.modeling import ModelLoadError, load_model, load_tokenizer, resolve_dtype, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model folder per architecture, built once for the module."""
    base = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(base / arch, arch) for arch in ("llama", "gpt2")}


@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_tiny_model_loads_from_folder(tiny, arch, cls):
    model, tokenizer = load_model(str(tiny[arch]), dtype="float32"), load_tokenizer(str(tiny[arch]))
    assert type(model).__name__ == cls
    assert not model.training                                    # eval mode
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)             # every token id has an embedding
    assert tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "what is 5,829 - 5,735 ?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")              # ChatML, as the default model
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))


def test_tiny_model_is_deterministic(tmp_path):
    first = load_model(str(build_tiny_model(tmp_path / "a", "llama", seed=3)), dtype="float32")
    second = load_model(str(build_tiny_model(tmp_path / "b", "llama", seed=3)), dtype="float32")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_resolve_dtype():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16                # short alias
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16        # a torch dtype passes through
    cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()       # DESIGN.md: bf16 only where native
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_bf16 else torch.float32)
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("float64")


def test_resolve_model_path_passes_through(tiny):
    assert resolve_model_path(str(tiny["gpt2"])) == str(tiny["gpt2"])        # a folder
    assert resolve_model_path("some-org/not-downloaded") == "some-org/not-downloaded"  # a hub id


def test_config_dict_and_chat_template(tiny):
    section = {"name_or_path": str(tiny["llama"]), "dtype": "float32", "chat_template": None}
    assert load_model({"model": section}).dtype == torch.float32  # the config's dtype is used
    tokenizer = load_tokenizer({"model": section}, chat_template="{{ messages[0]['content'] }}")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_lora_adapter_folder_loads_merged(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny["llama"]), dtype="float32")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # non-zero B: a real change
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = load_model(str(tmp_path / "adapter"), dtype="float32")
        got = merged(input_ids=ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"            # merged: a plain model again
    assert torch.allclose(got, expected, atol=1e-4)
    assert len(load_tokenizer(str(tmp_path / "adapter"))) == merged.config.vocab_size  # base's tokenizer


def test_small_lora_update_survives_a_half_precision_request(tiny, tmp_path):
    """A bf16 request keeps the base weights bf16 and the adapter a separate float32 module: merging
    W + dW into bf16 weights would round the update away (it once erased a whole quick SFT), a merge
    into float32 would double an 8B base's memory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(str(tiny["llama"]), dtype="float32"),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(1e-2)  # a short SFT's update: about 1% of the weights
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            update = expected - peft_model(input_ids=ids).logits   # what the adapter changes, in float32
        half = load_model(str(tmp_path / "adapter"), dtype="bfloat16")
        with half.disable_adapter():
            base = half(input_ids=ids).logits.float()
        kept = half(input_ids=ids).logits.float() - base            # what it changes in the bf16 model
    assert half.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16  # the base as asked
    assert {p.dtype for n, p in half.named_parameters() if "lora_" in n} == {torch.float32}
    assert update.abs().mean() > 1e-3                                            # the update is real...
    assert torch.corrcoef(torch.stack([update.flatten(), kept.flatten()]))[0, 1] > 0.9  # ...and kept
    assert 0.8 < float(kept.abs().mean() / update.abs().mean()) < 1.25
    # in float32 the adapter is merged (exact, and generation skips the LoRA matmuls)
    merged = load_model(str(tmp_path / "adapter"), dtype="float32")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert load_model(str(tiny["llama"]), dtype="bfloat16").dtype == torch.bfloat16  # a plain base: as asked


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="folder not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(tmp_path / "empty"))


def test_inspect_writes_a_loadable_config(tiny, tmp_path):
    output = tmp_path / "config_tiny.yaml"
    run = subprocess.run([sys.executable, "inspect_model_architecture.py", "--model",
                          str(tiny["gpt2"]), "--output", str(output)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "GPT2LMHeadModel" in run.stdout and "Conv1D x8" in run.stdout  # 4 per layer, 2 layers
    cfg = config_lib.load(output)
    assert cfg["model"]["architecture"] == "gpt2"
    assert {"c_attn", "c_proj"} <= set(cfg["lora"]["target_modules"])
    assert cfg["lora"]["fan_in_fan_out"] is True                  # Conv1D stores weights transposed
    assert cfg["metadata"]["layers"] == 2 and cfg["metadata"]["hidden_size"] == 64
    assert cfg["training"] == config_lib.load("smollm2-135m")["training"]  # copied from the default

    quiet = tmp_path / "not_written.yaml"
    run = subprocess.run([sys.executable, "inspect_model_architecture.py", "--model",
                          str(tiny["llama"]), "--output", str(quiet), "--no_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "attention: ['q_proj', 'k_proj', 'v_proj', 'o_proj']" in run.stdout
    assert "mlp: ['gate_proj', 'up_proj', 'down_proj']" in run.stdout
    assert not quiet.exists()


@pytest.mark.slow
def test_default_model_materialized():
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("models/SmolLM2-135M-Instruct is absent: run bash setup.sh")
    model, tokenizer = load_model("smollm2-135m", device="cpu"), load_tokenizer("smollm2-135m")
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    meta = yaml.safe_load((DEFAULT_MODEL / "materialized_from.json").read_text())
    assert meta["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_each_process_takes_its_own_device_and_the_config_dtype(monkeypatch):
    """Under `accelerate launch` on GPUs rank r loads onto cuda:r (not every rank onto cuda:0), and 03
    loads a LoRA run's frozen base in the config's dtype, a full fine-tune's weights in float32."""
    from utils import modeling, training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert modeling.default_device() == "cuda:1"
    monkeypatch.delenv("LOCAL_RANK")
    assert modeling.default_device() == "cuda:0"
    cfg = {"model": {"dtype": "auto"}, "lora": {"enabled": True}}
    assert training.sft_base_dtype(cfg) == torch.bfloat16          # auto on a bf16 GPU
    assert training.sft_base_dtype({**cfg, "model": {"dtype": "float16"}}) == torch.float16
    assert training.sft_base_dtype({**cfg, "lora": {"enabled": False}}) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.default_device() == "cpu"


def test_fused_head_scores_only_labelled_positions_on_cpu_with_the_same_log_probs(tiny, monkeypatch):
    """TRL's fused head on a CPU: the compact projection (labelled positions only) once the trainers' process
    state exists, and the log-probs it returns are those of the projection over every position."""
    import trl.trainer.utils as fused_head
    from trl.trainer.utils import add_fused_lm_head

    from utils import training

    monkeypatch.setattr(fused_head, "_use_triton", lambda device: False)  # TRL's choice off CUDA: every position
    model = load_model(str(tiny["llama"]), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt: no labels
    with torch.no_grad():
        every_position = model(input_ids=ids, labels=labels, fused_lm_head=True)
        training.process_state()
        training.fused_head_scores_labels_only()  # again: still one wrapper over TRL's choice
        assert fused_head._use_triton(torch.device("cpu")) and not fused_head._use_triton(torch.device("cuda"))
        labelled_only = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert torch.allclose(labelled_only.log_probs, every_position.log_probs, atol=1e-5)
    assert torch.allclose(labelled_only.entropy, every_position.entropy, atol=1e-5)
    assert (labelled_only.log_probs[:, 5:] != 0).all() and (labelled_only.log_probs[:, :5] == 0).all()
