"""Direction tests: does each method move the policy the way its reward says? (`python -m pytest -m direction`)

A reward whose optimum the test knows: 1 for a one-token completion in a fixed half of the vocabulary
(the tokens whose embedding points along a fixed direction), else 0; a few updates on the tiny random model
from an SFT adapter. Exact checks: the policy's probability of the rewarded tokens at the first
completion position rises; with the reward negated it falls; the reference policy (the frozen "ref"
adapter) does not move. DPO: pairs whose chosen side is one fixed answer ("yes" over "no"): log p(chosen)
- log p(rejected) rises, and falls with the sides swapped. They catch sign errors, wrong masks, wrong
advantages and a reference that is not the start policy: each fails when that method's advantage (DPO:
its loss) has its sign flipped.
"""
import pytest
import torch
from trl.trainer.utils import use_adapter

from tests.test_ppo import ppo_inputs  # noqa: F401 (fixture: tiny llama, non-zero SFT adapter, data)
from tests.test_reference import config, token_logprobs
from utils import rl

pytestmark = pytest.mark.direction
PROMPTS = [[{"role": "user", "content": text}] for text in
           ("what was the change in revenue ?", "was revenue higher in 2018 ?", "total revenue ?", "ratio ?")]


@pytest.fixture(scope="module")
def target(ppo_inputs):  # noqa: F811
    """The rewarded behaviour: a one-token completion from a fixed half of the vocabulary, the tokens
    whose (tied) embedding points along a fixed random direction, so a LoRA update can reach it.
    Returns (texts: the rewarded decoded texts, mask: [vocab] bool over token ids)."""
    from utils.modeling import load_model, load_tokenizer

    embeddings = load_model(str(ppo_inputs / "tiny"), dtype="float32").get_input_embeddings().weight.detach()
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    tokenizer = load_tokenizer(str(ppo_inputs / "tiny"))
    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(embeddings))]
    chosen = {text for text, score in zip(texts, (embeddings @ direction).tolist()) if score > 0 and text}
    return chosen, torch.tensor([text in chosen for text in texts])


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The templated prompt's token ids, as utils.generation and TRL's trainers build them."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rewarded_mass(model, tokenizer, mask) -> float:
    """Probability, averaged over PROMPTS, that the first completion token is a rewarded one."""
    model.eval()  # no LoRA dropout in the measurement
    mass = []
    with torch.no_grad():
        for prompt in PROMPTS:
            logits = model(input_ids=torch.tensor([prompt_ids(tokenizer, prompt)])).logits[0, -1].float()
            mass.append(float(logits[:len(mask)].softmax(-1)[mask].sum()))
    return sum(mass) / len(mass)


def reference_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{rl.REFERENCE_ADAPTER}." in n}


def check_direction(sign: int, before: float, after: float, ref_before: dict, model) -> None:
    moved = after - before
    assert moved * sign > 0.01, f"rewarded mass {before:.3f} -> {after:.3f} with reward sign {sign:+d}"
    for name, weight in reference_weights(model).items():
        assert torch.equal(weight, ref_before[name]), f"the reference moved: {name}"


def token_reward(sign: int, texts: set):
    def reward(completions, **_):
        return [sign * float((c[0]["content"] if isinstance(c, list) else c) in texts) for c in completions]
    reward.__name__ = "target_token"
    return reward


@pytest.mark.parametrize("sign", [1, -1], ids=["reward", "negated"])
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_trl_online_method_moves_toward_its_reward(method, sign, target, ppo_inputs, tmp_path):  # noqa: F811
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    torch.manual_seed(0)
    model, tokenizer, _ = rl.load_policy(ppo_inputs / "sft", config(method, ppo_inputs))
    start_ref = token_logprobs(model)
    before = rewarded_mass(model, tokenizer, target[1])
    Config, Trainer = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[method]
    args = Config(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=16, learning_rate=1e-1,
                  per_device_train_batch_size=8, num_generations=4, max_completion_length=1, beta=0.01,
                  temperature=1.0, logging_steps=1, save_strategy="no", seed=0, disable_dropout=True,
                  bf16=False)  # float32 throughout: no autocast around the model after training
    trainer = Trainer(model=model, reward_funcs=[token_reward(sign, target[0])], args=args,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS] * 16), processing_class=tokenizer)
    ref_before = reference_weights(trainer.model)
    trainer.train()
    check_direction(sign, before, rewarded_mass(trainer.model, tokenizer, target[1]), ref_before, trainer.model)
    with use_adapter(trainer.model, rl.REFERENCE_ADAPTER):
        torch.testing.assert_close(token_logprobs(trainer.model), start_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sign", [1, -1], ids=["reward", "negated"])
def test_ppo_moves_toward_its_reward(sign, target, ppo_inputs, monkeypatch):  # noqa: F811
    from types import SimpleNamespace

    from accelerate import Accelerator

    import utils.ppo as ppo
    from utils.rewards import RewardSpec

    torch.manual_seed(0)
    cfg = config("ppo", ppo_inputs)
    cfg["algorithm"].update(rollout_batch_size=16, ppo_epochs=4, num_mini_batches=2, kl_coef=0.01,
                            adaptive_kl=False, normalize_rewards=False, whiten_rewards=False, temperature=1.0,
                            top_p=1.0)
    cfg["training"].update(learning_rate=3e-2, max_steps=8, warmup_ratio=0.0, per_device_train_batch_size=8)
    cfg["generation"].update(max_new_tokens=1, batch_size=16)
    # the test's reward instead of the FinQA score (PPO reads only these fields of a RewardResult)
    monkeypatch.setattr(ppo, "score", lambda text, example, spec: SimpleNamespace(
        total=sign * float(text in target[0]), exact_match=False, numeric_close=False, program_match=0.0,
        format_valid=True))
    policy, tokenizer, _ = rl.load_policy(ppo_inputs / "sft", cfg)
    model = ppo.build_policy(policy, cfg)
    start_ref = token_logprobs(policy)
    before = rewarded_mass(policy, tokenizer, target[1])
    policy.train()
    ref_before = reference_weights(policy)
    trainer = ppo.PPOTrainer(cfg, model, tokenizer, RewardSpec(), Accelerator(cpu=True))
    for step in range(1, 9):
        trainer.step([{"prompt": p} for p in PROMPTS] * 4, step)
    check_direction(sign, before, rewarded_mass(policy, tokenizer, target[1]), ref_before, policy)
    with use_adapter(policy, rl.REFERENCE_ADAPTER):
        torch.testing.assert_close(token_logprobs(policy), start_ref, atol=1e-5, rtol=0)


GOOD, BAD = "yes", "no"


def preference_margin(model, tokenizer) -> float:
    """Mean over PROMPTS of log p(GOOD) - log p(BAD) as the completion."""
    margins = []
    model.eval()  # no LoRA dropout in the measurement
    with torch.no_grad():
        for prompt in PROMPTS:
            head = prompt_ids(tokenizer, prompt)
            logps = []
            for text in (GOOD, BAD):
                tail = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([head + tail])
                logits = model(input_ids=ids).logits[0, len(head) - 1:-1].float()
                logps.append(float(logits.log_softmax(-1).gather(-1, ids[0, len(head):, None]).sum()))
            margins.append(logps[0] - logps[1])
    return sum(margins) / len(margins)


@pytest.mark.parametrize("sign", [1, -1], ids=["chosen_good", "chosen_bad"])
def test_dpo_moves_toward_the_chosen_side(sign, ppo_inputs, tmp_path):  # noqa: F811
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model, tokenizer, _ = rl.load_policy(ppo_inputs / "sft", config("dpo", ppo_inputs))
    start_ref = token_logprobs(model)
    before = preference_margin(model, tokenizer)
    chosen, rejected = (GOOD, BAD) if sign > 0 else (BAD, GOOD)
    pairs = Dataset.from_list([{"prompt": p, "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]} for p in PROMPTS] * 4)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=8, learning_rate=3e-2,
                     per_device_train_batch_size=4, beta=0.1, logging_steps=1, save_strategy="no", seed=0,
                     bf16=False)  # float32 throughout: no autocast around the model after training
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    ref_before = reference_weights(trainer.model)
    trainer.train()
    after = preference_margin(trainer.model, tokenizer)
    assert (after - before) * sign > 0.5, f"log p(good) - log p(bad): {before:.3f} -> {after:.3f}"
    for name, weight in reference_weights(trainer.model).items():
        assert torch.equal(weight, ref_before[name]), f"the reference moved: {name}"
    with use_adapter(trainer.model, rl.REFERENCE_ADAPTER):
        torch.testing.assert_close(token_logprobs(trainer.model), start_ref, atol=1e-5, rtol=0)
