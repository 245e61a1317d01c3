"""PPO: the math of utils/ppo.py against hand-computed values, then 05_train_ppo.py as a subprocess
on a tiny random model (quick test, checkpoints, validation files, --resume)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.ppo import (AdaptiveKLController, FixedKLController, RunningMoments, compute_gae, entropy_from_logits,
                       explained_variance, kl_penalty_rewards, logprobs_from_logits, masked_whiten, policy_loss,
                       value_loss)

REPO = Path(__file__).resolve().parent.parent
t = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731


def check_step_times(entry: dict) -> None:
    """Where a step's time went (05's log, and utils.rl.StepTimes's for GRPO/RLOO): each part measured,
    none negative, and together no more than the whole step (GRPO/RLOO: the step, update is the rest)."""
    parts = [entry[f"time/{part}_s"] for part in ("generate", "rewards", "reference", "update")]
    assert entry["time/generate_s"] > 0 and entry["time/update_s"] > 0 and min(parts) >= 0
    assert sum(parts) <= entry["time/step_s"] + 0.01


# --- math ---
def test_gae_three_tokens_gamma_1_lam_095():
    # one response of 3 tokens and 1 padding position; reward only at the last token
    rewards, values, mask = t([0.0, 0.0, 1.0, 7.0]), t([0.5, 0.6, 0.8, 9.0]), t([1, 1, 1, 0])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 1 * 0 (no state after the end) - 0.8 = 0.2;   A2 = 0.2
    # t=1: delta = 0 + 0.8 - 0.6 = 0.2;                               A1 = 0.2 + 0.95 * 0.2 = 0.39
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;                               A0 = 0.1 + 0.95 * 0.39 = 0.4705
    # returns = A + V = [0.9705, 0.99, 1.0]; padding (reward 7, value 9) is ignored and stays 0
    assert torch.allclose(advantages, t([0.4705, 0.39, 0.2, 0.0]), atol=1e-6)
    assert torch.allclose(returns, t([0.9705, 0.99, 1.0, 0.0]), atol=1e-6)


def test_gae_discount_and_batch_rows_independent():
    # gamma 0.5, lam 1: A_t = sum_k 0.5^k delta_{t+k}, i.e. discounted return minus V_t
    rewards, values, mask = t([1.0, 2.0], [4.0, 0.0]), t([0.0, 0.0], [1.0, 3.0]), t([1, 1], [1, 0])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # row 0: A1 = 2;  A0 = 1 + 0.5 * 0 - 0 + 0.5 * 2 = 2;  returns = [2, 2]
    # row 1 (one token): A0 = 4 + 0 - 1 = 3; returns = 3 + 1 = 4
    assert torch.allclose(advantages, t([2.0, 2.0], [3.0, 0.0]))
    assert torch.allclose(returns, t([2.0, 2.0], [4.0, 0.0]))


def test_clipped_surrogate_one_of_two_ratios_clipped():
    old = t([0.0, 0.0])
    new = torch.log(t([1.5, 1.1]))          # ratios 1.5 (outside 1 +- 0.2) and 1.1 (inside)
    advantages, mask = t([1.0, 2.0]), t([1, 1])
    loss, clipfrac, approx_kl = policy_loss(new, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1.5 * 1, -1.2 * 1) = -1.2 (clipped term active);  token 1: max(-2.2, -2.2) = -2.2
    # loss = (-1.2 - 2.2) / 2 = -1.7;  clipfrac = 1 / 2
    # approx_kl (k3) = ((0.5 - ln 1.5) + (0.1 - ln 1.1)) / 2 = (0.0945349 + 0.0046898) / 2 = 0.0496124
    assert loss.item() == pytest.approx(-1.7, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.0496124, abs=1e-6)


def test_clipped_surrogate_negative_advantage_and_padding():
    # A < 0 and ratio 0.5 < 0.8: max(-(-1) * 0.5, -(-1) * 0.8) = 0.8, the clipped term; the padded
    # token (ratio e, A 100) must not count
    loss, clipfrac, _ = policy_loss(t([math.log(0.5), 1.0]), t([0.0, 0.0]), t([-1.0, 100.0]), t([1, 0]), 0.2)
    assert loss.item() == pytest.approx(0.8)
    assert clipfrac.item() == pytest.approx(1.0)


def test_clipped_value_loss():
    values, old_values, returns, mask = t([1.0, 0.0]), t([0.5, 0.5]), t([1.2, 1.0]), t([1, 1])
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: V_clip = 0.5 + clip(0.5) = 0.7: max((1.0 - 1.2)^2, (0.7 - 1.2)^2) = max(0.04, 0.25) = 0.25 (clipped)
    # token 1: V_clip = 0.5 - 0.2 = 0.3:     max((0.0 - 1.0)^2, (0.3 - 1.0)^2) = max(1.0, 0.49) = 1.0
    # loss = 0.5 * (0.25 + 1.0) / 2 = 0.3125; clipfrac = 1 / 2
    assert loss.item() == pytest.approx(0.3125)
    assert clipfrac.item() == pytest.approx(0.5)


def test_kl_penalty_rewards():
    logprobs, ref_logprobs = t([-1.0, -2.0, -0.5], [-1.0, -3.0, -4.0]), t([-1.5, -2.0, -1.0], [-2.0, -1.0, -9.0])
    mask, scores = t([1, 1, 1], [1, 1, 0]), t(2.0, -1.0)
    rewards, kl = kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: kl = [0.5, 0, 0.5] -> r = [-0.05, 0, -0.05 + 2.0 (score on the last token)]
    # row 1: kl = [1.0, -2.0, pad 0] -> r = [-0.1, 0.2 - 1.0 (last real token), 0]
    assert torch.allclose(kl, t([0.5, 0.0, 0.5], [1.0, -2.0, 0.0]))
    assert torch.allclose(rewards, t([-0.05, 0.0, 1.95], [-0.1, -0.8, 0.0]))


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.05, target=6.0, horizon=100)
    controller.update(6.6, n_steps=10)   # e = 6.6 / 6 - 1 = 0.1; x (1 + 0.1 * 10 / 100) = 0.05 * 1.01
    assert controller.value == pytest.approx(0.0505)
    controller.update(60.0, n_steps=10)  # e = 9 clipped to 0.2; x 1.02
    assert controller.value == pytest.approx(0.0505 * 1.02)
    controller.update(0.0, n_steps=50)   # e = -1 clipped to -0.2; x (1 - 0.2 * 50 / 100) = x 0.9
    assert controller.value == pytest.approx(0.0505 * 1.02 * 0.9)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=10)      # fixed: unchanged
    assert fixed.value == 0.05


def test_explained_variance():
    returns, mask = t([1.0, 2.0, 3.0, 50.0]), t([1, 1, 1, 0])
    # residual [0, 0, 1]: var 2/9; var(returns) = 2/3 -> 1 - (2/9) / (2/3) = 2/3
    assert explained_variance(t([1.0, 2.0, 2.0, 0.0]), returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)   # perfect values
    assert explained_variance(t([5.0, 5.0, 5.0, 0.0]), returns, mask) == pytest.approx(0.0)  # a constant


def test_running_moments_and_whitening():
    moments = RunningMoments()
    moments.update(t(1.0, 2.0, 3.0))
    moments.update(t(4.0, 5.0))
    # the population mean and variance of 1..5: 3 and 2
    assert (moments.mean, moments.var, moments.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    assert torch.allclose(moments.normalize(t(3.0, 3.0 + math.sqrt(2))), t(0.0, 1.0))
    whitened = masked_whiten(t([1.0, 3.0, 100.0]), t([1, 1, 0]))
    assert torch.allclose(whitened, t([-1.0, 1.0, 0.0]), atol=1e-4)  # mean 2, std 1; padding zeroed


def test_logprobs_and_entropy_from_logits():
    logits = torch.log(t([[0.5, 0.25, 0.25]]))
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    # H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2))


# --- 05_train_ppo.py on a tiny random model ---
@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory):
    """A tiny random llama, an "SFT" LoRA adapter on it, and synthetic processed data."""
    from peft import LoraConfig, get_peft_model

    from utils.data import to_processed
    from tests.fixtures.tiny_model import build_tiny_model
    from utils.modeling import load_model
    from utils.runs import atomic_write_jsonl
    from utils.synthetic import generate

    root = tmp_path_factory.mktemp("ppo")
    tiny = build_tiny_model(root / "tiny", "llama", seed=0)
    torch.manual_seed(0)  # LoRA's A is drawn from the global RNG: the same adapter whatever ran before
    sft = get_peft_model(load_model(str(tiny), dtype="float32", device="cpu"),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter, so merging it into the base changes the model
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    sft.save_pretrained(str(root / "sft"))
    splits = generate(40, seed=0)
    for split, name in (("train", "train"), ("dev", "val")):
        atomic_write_jsonl(root / "data" / f"{name}.jsonl",
                           [to_processed(raw, name, "retrieved", source="synthetic") for raw in splits[split]])
    return root


def ppo_command(root: Path, out: Path, *extra: str) -> list[str]:
    return ["05_train_ppo.py", "--quick_test", "--policy_ckpt", str(root / "sft"),
            "--train_jsonl", str(root / "data" / "train.jsonl"), "--val_jsonl", str(root / "data" / "val.jsonl"),
            "--output_dir", str(out), "--model.name_or_path", str(root / "tiny"), "--model.dtype", "float32",
            # a random model scores -0.2 on every completion: normalized, every reward would be 0 and
            # nothing would train; raw rewards give the value head something to fit
            "--algorithm.normalize_rewards", "false", "--training.warmup_ratio", "0",
            "--algorithm.ppo_epochs", "2", *extra]


def run_script(command: list[str], launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    done = subprocess.run([*launcher, *command], cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"{command[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


@pytest.fixture(scope="module")
def quick_run(ppo_inputs):
    out = ppo_inputs / "run"
    run_script(ppo_command(ppo_inputs, out))
    return out


UPDATE_KEYS = ("reward", "reward_std", "rewards/exact/mean", "rewards/format_error/mean", "kl", "entropy",
               "completions/mean_length", "loss", "grad_norm", "learning_rate", "train/tokens_per_s",
               "ppo/value_loss", "ppo/policy_loss", "ppo/clipfrac", "ppo/approx_kl",
               "ppo/kl_coef", "ppo/returns_mean", "ppo/advantages_mean")


@pytest.mark.slow
def test_quick_test_writes_checkpoints_logs_and_validation(quick_run):
    from utils.modeling import load_model

    for name in ("step_1", "step_2", "best", "final"):
        folder = quick_run / "ckpt_ppo" / name
        for file in ("adapter_config.json", "adapter_model.safetensors", "value_head.pt", "config.yaml"):
            assert (folder / file).is_file(), f"{folder / file} missing"
    assert (quick_run / "ckpt_ppo" / "step_2" / "trainer_state.pt").is_file()
    best = json.loads((quick_run / "ckpt_ppo" / "best" / "validation.json").read_text())
    assert best["step"] == 2 and {"exec_acc", "reward_mean", "format_rate"} <= set(best["metrics"])
    # the trained SFT adapter names the base model, so it loads like the SFT checkpoint
    config = json.loads((quick_run / "ckpt_ppo" / "final" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).resolve() == (quick_run.parent / "tiny").resolve()
    assert not (quick_run / "reference_model").exists() and not (quick_run / "ckpt_ppo" / "final" / "ref").exists()
    assert load_model(str(quick_run / "ckpt_ppo" / "final"), dtype="float32", device="cpu") is not None
    head = torch.load(quick_run / "ckpt_ppo" / "final" / "value_head.pt", weights_only=True)
    assert head["weight"].shape == (1, 64)

    log = json.loads((quick_run / "logs" / "training_log.json").read_text())["log_history"]
    assert list((quick_run / "logs").glob("events.out.tfevents.*"))  # TensorBoard beside it (report_to default)
    updates = [entry for entry in log if "ppo/value_loss" in entry]
    assert [entry["step"] for entry in updates] == [1, 2]
    for entry in updates:
        missing = [key for key in UPDATE_KEYS if key not in entry]
        assert not missing, f"step {entry['step']} lacks {missing}"
        assert all(math.isfinite(entry[key]) for key in UPDATE_KEYS)
        # undefined (all returns equal) is null, never a made-up 0.0
        assert entry["ppo/explained_variance"] is None or math.isfinite(entry["ppo/explained_variance"])
        check_step_times(entry)
        assert entry["time/reference_s"] > 0     # PPO always takes the reference pass (kl_coef > 0)
    assert updates[0]["ppo/value_loss"] > 0      # the value head fits the -0.2 rewards
    assert updates[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 1 samples from the SFT policy itself
    validation = [entry for entry in log if "val/exec_acc" in entry]
    assert [entry["step"] for entry in validation] == [2]
    assert {"val/reward_mean", "val/format_rate"} <= set(validation[0])

    rows = [json.loads(line) for line in (quick_run / "val_generations" / "step_2.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"id", "completion", "total", "exec_correct"} <= set(row) for row in rows)
    manifest = json.loads((quick_run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["training"]["max_steps"] == 2 and manifest["metrics"]["global_step"] == 2
    assert {"train", "val", "policy_ckpt"} <= set(manifest["inputs"])


@pytest.mark.slow
def test_resume_continues_from_step_2(quick_run, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(quick_run, out)
    run_script(ppo_command(quick_run.parent, out, "--max_steps", "3", "--resume"))
    log = json.loads((out / "logs" / "training_log.json").read_text())["log_history"]
    updates = {entry["step"]: entry for entry in log if "ppo/value_loss" in entry}
    assert sorted(updates) == [1, 2, 3]  # steps 1-2 kept from the first run, 3 added
    assert (out / "ckpt_ppo" / "step_3" / "trainer_state.pt").is_file()
    assert (out / "val_generations" / "step_3.jsonl").is_file()
    # the KL controller was restored: step 3 uses step 2's coefficient after its update
    # kl_coef *= 1 + clip(kl / 6 - 1, -0.2, 0.2) * 4 / 10000 (4 samples per step, horizon 10000)
    step2 = updates[2]
    error = min(max(step2["ppo/kl_per_completion"] / 6.0 - 1.0, -0.2), 0.2)
    assert updates[3]["ppo/kl_coef"] == pytest.approx(step2["ppo/kl_coef"] * (1 + error * 4 / 10000), rel=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["resumed_from_step"] == 2
