"""One reference-policy mechanism for PPO, GRPO, RLOO and DPO (utils.rl.load_policy): the start
(SFT) adapter is trained, and the reference is a frozen copy of it, the adapter "ref", over the
same base weights. For each method, on one fixed batch: the reference log-probs equal the SFT
checkpoint's own log-probs to 1e-5, also after the trained adapter has moved, and the base
weights keep the config's dtype (never upcast to hold a merged update)."""
import copy
import inspect

import pytest
import torch

from tests.test_ppo import ppo_inputs  # noqa: F401 (fixture: tiny llama, non-zero SFT adapter, data)
from utils import rl
from utils.config import load

IDS = torch.tensor([[5, 17, 99, 230, 41, 8, 301, 77, 12, 3],
                    [0, 0, 0, 64, 128, 256, 33, 19, 420, 7]])  # the second row left-padded
ATTENTION = (IDS != 0).long()


def token_logprobs(model) -> torch.Tensor:
    """log p(token_t | tokens_<t) of the fixed batch, [2, 9], padding zeroed (eval mode: no LoRA dropout)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=ATTENTION,
                       position_ids=(ATTENTION.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1].float()
    logprobs = logits.log_softmax(-1).gather(-1, IDS[:, 1:, None]).squeeze(-1)
    return logprobs * ATTENTION[:, 1:]


def sft_logprobs(root) -> torch.Tensor:
    from utils.modeling import load_model

    return token_logprobs(load_model(str(root / "sft"), dtype="float32", device="cpu"))


def config(method: str, root, dtype="float32") -> dict:
    cfg = load("smollm2-135m", method, ["--model.name_or_path", str(root / "tiny"), "--model.dtype", dtype])
    cfg["training"]["gradient_checkpointing"] = False
    return cfg


def move_trained_adapter(model) -> None:
    """What training does: the trained ("default") adapter moves away from the SFT one."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)


def reference_logprobs(model) -> torch.Tensor:
    from trl.trainer.utils import use_adapter

    with use_adapter(model, rl.REFERENCE_ADAPTER):
        return token_logprobs(model)


def trl_policy(method: str, root):
    """The policy after the TRL trainer of `method` took it (the trainer adds the "ref" adapter)."""
    from datasets import Dataset

    cfg = config(method, root)
    model, tokenizer, _ = rl.load_policy(root / "sft", cfg)
    args = dict(output_dir=str(root / f"trainer_{method}"), report_to=[], use_cpu=True, max_steps=1,
                per_device_train_batch_size=2)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}],
                                    "chosen": [{"role": "assistant", "content": "a"}],
                                    "rejected": [{"role": "assistant", "content": "b"}]}] * 2)
        trainer = DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=pairs, processing_class=tokenizer)
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Config, Trainer = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[method]
        prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}]}] * 2)
        trainer = Trainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          args=Config(**args, num_generations=2, beta=0.1, max_completion_length=4),
                          train_dataset=prompts, processing_class=tokenizer)
    return trainer.model


@pytest.mark.parametrize("method", ["grpo", "rloo", "dpo"])
def test_trl_reference_is_the_sft_policy(method, ppo_inputs):  # noqa: F811
    model = trl_policy(method, ppo_inputs)
    expected = sft_logprobs(ppo_inputs)
    assert rl.REFERENCE_ADAPTER in model.peft_config, "TRL no longer adds its frozen 'ref' adapter"
    torch.testing.assert_close(token_logprobs(model), expected, atol=1e-5, rtol=0)  # step 0: policy = SFT
    move_trained_adapter(model)
    assert (token_logprobs(model) - expected).abs().max() > 1e-3  # the policy moved...
    torch.testing.assert_close(reference_logprobs(model), expected, atol=1e-5, rtol=0)  # ...the reference did not
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{rl.REFERENCE_ADAPTER}." in n)


def test_trl_takes_reference_passes_under_the_ref_adapter():
    """The mechanism test_trl_reference_is_the_sft_policy relies on: TRL's trainers compute the
    reference log-probs with use_adapter(model, "ref") when that adapter exists. Fails loudly if a
    TRL upgrade changes it."""
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

    for trainer in (GRPOTrainer, RLOOTrainer, DPOTrainer):
        source = inspect.getsource(trainer)
        assert 'adapter_name="ref" if "ref" in' in source, f"{trainer.__name__} takes its reference another way"
        assert 'model.add_adapter("ref", default_config)' in source, f"{trainer.__name__} adds no 'ref' adapter"


def test_ppo_reference_is_the_sft_policy_and_dropout_is_off(ppo_inputs):  # noqa: F811
    from utils.ppo import build_policy

    cfg = config("ppo", ppo_inputs)                       # lora.dropout 0.05: must be switched off
    policy, _, _ = rl.load_policy(ppo_inputs / "sft", cfg)
    model = build_policy(policy, cfg)
    expected = sft_logprobs(ppo_inputs)
    logits, values = model(IDS, ATTENTION, 4)
    again, _ = model(IDS, ATTENTION, 4)
    assert torch.equal(logits, again)                     # deterministic: no dropout in train mode
    assert values.shape == (2, 4) and torch.all(values == 0)  # zero-initialised value head
    move_trained_adapter(model.policy)
    assert (token_logprobs(model.policy) - expected).abs().max() > 1e-3
    reference = model.reference_logits(IDS, ATTENTION, IDS.shape[1] - 1).log_softmax(-1)
    reference = reference.gather(-1, IDS[:, 1:, None]).squeeze(-1) * ATTENTION[:, 1:]
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    trainable = {name.split(".")[-3] if "lora" in name else name  # ...q_proj.lora_A.default.weight
                 for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "value_head.weight", "value_head.bias"}
    assert all(".default." in name for name, p in model.named_parameters() if p.requires_grad and "lora" in name)


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo", "dpo"])
def test_base_weights_keep_the_config_dtype(method, ppo_inputs):  # noqa: F811
    # an 8B base in bf16 stays 16 GB: nothing upcasts it to float32 to hold a merged SFT update;
    # the adapters (SFT update and the trained copy) stay float32, so nothing is rounded away
    policy, _, info = rl.load_policy(ppo_inputs / "sft", config(method, ppo_inputs, dtype="bfloat16"))
    assert info["dtype"] == "bfloat16"
    assert policy.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in policy.named_parameters() if "lora_" in n} == {torch.float32}


def test_rl_checkpoints_load_like_sft_checkpoints(ppo_inputs, tmp_path):  # noqa: F811
    """Saving the trained policy writes the "default" adapter alone, over the base model, so
    load_model reads an RL checkpoint exactly as it reads the SFT one."""
    from utils.modeling import load_model
    from utils.training import save_policy

    cfg = config("grpo", ppo_inputs)
    model = trl_policy("grpo", ppo_inputs)
    move_trained_adapter(model)
    trained = token_logprobs(model)
    save_policy(model, None, copy.deepcopy(cfg), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / rl.REFERENCE_ADAPTER).exists()
    torch.testing.assert_close(token_logprobs(load_model(str(tmp_path / "ckpt"), dtype="float32", device="cpu")),
                               trained, atol=1e-5, rtol=0)
