"""GRPO and RLOO: the leave-one-out baseline and RLOO's sample log against hand-computed values,
then 06_train_grpo.py and 07_train_rloo.py as subprocesses on a tiny random model (quick test,
checkpoints, logs, validation files, manifest, --resume)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# the tiny random llama, a non-zero "SFT" LoRA adapter on it, synthetic train/val data
from tests.test_ppo import check_step_times, ppo_inputs, run_script  # noqa: F401 (ppo_inputs is a fixture)
from utils.rewards import RewardSpec
from utils.rl import SampleLog, leave_one_out_baselines, reward_functions

TABLE = [["", "2018", "2017"], ["revenue", "$ 5,829", "$ 5,735"]]

REPO = Path(__file__).resolve().parent.parent


# --- leave-one-out baseline ---
@pytest.mark.parametrize("rewards, k, expected", [
    ([1.0, 0.0, 0.0, 1.0], 2, [0.0, 1.0, 1.0, 0.0]),          # pairs: each one's baseline is the other
    ([1.0, 2.0, 3.0], 3, [2.5, 2.0, 1.5]),                    # (2+3)/2, (1+3)/2, (1+2)/2
    ([0.5, 0.5, 0.5, 0.5], 4, [0.5, 0.5, 0.5, 0.5]),          # equal rewards: advantage 0 everywhere
    ([1.3, -0.2, 0.8, -0.2, 4.0, 0.0], 3, [0.3, 1.05, 0.55, 2.0, -0.1, 1.9]),  # two groups, never mixed
])
def test_leave_one_out_baselines(rewards, k, expected):
    assert leave_one_out_baselines(rewards, k) == pytest.approx(expected)


@pytest.mark.parametrize("rewards, k", [
    ([1.0, 2.0], 1),          # no other sample to average
    ([1.0, 2.0, 3.0], 2),     # 3 rewards do not make groups of 2
])
def test_leave_one_out_baselines_rejects_bad_groups(rewards, k):
    with pytest.raises(ValueError):
        leave_one_out_baselines(rewards, k)


def loo_and_reinforce_gradient_variance(probs, action_rewards, num_prompts=256, k=4, seed=0):
    """Total variance E||c_i - mean(c)||^2 of the per-sample policy-gradient contributions of plain
    REINFORCE (c_i = R_i g_i) and RLOO (c_i = (R_i - b_i) g_i) on the same batch, for a softmax
    policy over a few actions, whose score function is g(a) = onehot(a) - probs."""
    probs, action_rewards = torch.tensor(probs), torch.tensor(action_rewards)
    actions = torch.multinomial(probs, num_prompts * k, replacement=True,
                                generator=torch.Generator().manual_seed(seed))
    gradients = torch.nn.functional.one_hot(actions, len(probs)).float() - probs
    rewards = action_rewards[actions]
    baselines = torch.tensor(leave_one_out_baselines(rewards.tolist(), k))
    variance = lambda c: float(((c - c.mean(0)) ** 2).sum(1).mean())  # noqa: E731
    return variance((rewards - baselines)[:, None] * gradients), variance(rewards[:, None] * gradients)


def test_loo_baseline_lowers_gradient_variance_when_rewards_sit_away_from_zero():
    # Expected per-sample variance: REINFORCE ~ (sigma^2 + mu^2) E||g||^2, leave-one-out with k = 4
    # ~ sigma^2 (1 + 1/3) E||g||^2. Mean reward 0.825, variance 0.21 here: the baseline wins ~4x
    loo, reinforce = loo_and_reinforce_gradient_variance([0.25, 0.25, 0.25, 0.25], [1.3, 1.1, 0.8, 0.1])
    assert loo < 0.4 * reinforce


def test_loo_baseline_adds_variance_when_almost_every_reward_is_zero():
    # The case the FinQA SFT start is in (most samples score 0): mu^2 (0.004) < sigma^2 / 3 (0.027),
    # so 0 is the better baseline and the noisy 3-sample mean adds variance (about 1.12x, the limit
    # measured on 80k samples)
    loo, reinforce = loo_and_reinforce_gradient_variance([0.05, 0.35, 0.3, 0.3], [1.3, 0.0, 0.0, 0.0],
                                                         num_prompts=2048)
    assert loo > 1.05 * reinforce


def test_sample_log_writes_totals_loo_baselines_and_drops_steps_redone_after_resume(tmp_path):
    """RLOO's per-sample log, fed through TRL's reward-function hook (trainer_state), as RLOOTrainer
    calls the reward functions: one after the other on the same generation batch."""
    path = tmp_path / "rloo_samples.jsonl"
    # an interrupted run logged steps 4 and 5; the resumed trainer (global_step 4) redoes step 5
    path.write_text("".join(json.dumps({"step": s, "reward": 0.0}) + "\n" for s in (4, 5)))
    log = SampleLog(path, group_size=2)
    functions, weights = reward_functions(RewardSpec(), log)
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)
    completions = [[{"role": "assistant", "content": text}] for text in (
        '{"program": "subtract(5829, 5735)", "answer": "94"}',    # exact: total 1 + 0.3 (numeric counts only without exact)
        "not json",                                              # format_error: total -0.2
        '{"program": "add(5829, 5735)", "answer": "11564"}',     # valid but wrong: total 0.0
        "still not json")]                                       # -0.2
    columns = {"id": ["a", "a", "b", "b"], "table": [TABLE] * 4, "exe_ans": [94.0, 94.0, 0.5, 0.5],
               "target_program": ["subtract(5829, 5735)"] * 2 + ["divide(1, 2)"] * 2,
               "target_answer": ["94", "94", "0.5", "0.5"]}
    for function in functions:
        function(completions, trainer_state=state, **columns)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 5, 5, 5, 5]   # the old step 5 replaced by the new batch
    new = rows[1:]
    assert [r["reward"] for r in new] == pytest.approx([1.3, -0.2, 0.0, -0.2])
    # baselines, groups (a, a), (b, b): each the other's reward
    assert [r["baseline"] for r in new] == pytest.approx([-0.2, 1.3, -0.2, 0.0])
    assert [r["loo_advantage"] for r in new] == pytest.approx([1.5, -1.5, 0.2, -0.2])
    assert [(r["id"], r["group"]) for r in new] == [("a", 0), ("a", 0), ("b", 1), ("b", 1)]
    assert new[1]["rewards"] == {"exact": 0.0, "numeric": 0.0, "program": 0.0, "format_error": 1.0}
    assert weights == [1.0, 0.8, 0.3, -0.2]


def test_rloo_baseline_other_than_loo_is_a_config_error():
    done = subprocess.run([sys.executable, "07_train_rloo.py", "--algorithm.baseline", "mean"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--algorithm.baseline: cannot use 'mean': expected one of 'loo'" in done.stderr


# --- 06 / 07 on a tiny random model ---
def rl_command(script: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [script, "--quick_test", "--policy_ckpt", str(root / "sft"),
            "--train_jsonl", str(root / "data" / "train.jsonl"), "--val_jsonl", str(root / "data" / "val.jsonl"),
            "--output_dir", str(out), "--model.name_or_path", str(root / "tiny"), *extra]


@pytest.fixture(scope="module")
def grpo_run(ppo_inputs):  # noqa: F811
    out = ppo_inputs / "grpo"
    run_script(rl_command("06_train_grpo.py", ppo_inputs, out))
    return out


@pytest.fixture(scope="module")
def rloo_run(ppo_inputs):  # noqa: F811
    out = ppo_inputs / "rloo"
    # beta 0: the logged loo_advantage is then exactly RLOOTrainer's advantage
    run_script(rl_command("07_train_rloo.py", ppo_inputs, out, "--algorithm.beta", "0.0"))
    return out


STEP_KEYS = ("reward", "reward_std", "rewards/exact/mean", "rewards/numeric/mean", "rewards/program/mean",
             "rewards/format_error/mean", "entropy", "completions/mean_length", "clip_ratio/region_mean", "loss",
             "grad_norm", "learning_rate", "step_time", "train/tokens_per_s")


def check_outputs(out: Path, module: str, steps=(1, 2)) -> list[dict]:
    """The layout every RL method shares; returns the training log entries."""
    from utils.modeling import load_model

    method = module.split("_")[1]
    for name in (*(f"step_{s}" for s in steps), "best", "final"):
        folder = out / f"ckpt_{method}" / name
        for file in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "tokenizer.json"):
            assert (folder / file).is_file(), f"{folder / file} missing"
        assert not (folder / "ref").exists(), "TRL's frozen reference adapter must not be saved with the policy"
    assert load_model(str(out / f"ckpt_{method}" / "final"), dtype="float32", device="cpu") is not None

    log = json.loads((out / "logs" / "training_log.json").read_text())["log_history"]
    assert list((out / "logs").glob("events.out.tfevents.*"))  # TensorBoard beside it (report_to default)
    updates = [entry for entry in log if "reward" in entry]
    assert [entry["step"] for entry in updates] == list(steps)
    for entry in updates:
        missing = [key for key in STEP_KEYS if key not in entry]
        assert not missing, f"step {entry['step']} lacks {missing}"
        assert all(math.isfinite(entry[key]) for key in STEP_KEYS)
        check_step_times(entry)
        assert entry["peak_rss_gb"] > 0.1
    validations = [entry for entry in log if "val/exec_acc" in entry]
    assert validations[-1]["step"] == steps[-1]
    assert {"val/reward_mean", "val/format_rate"} <= set(validations[-1])
    best = json.loads((out / f"ckpt_{method}" / "best" / "validation.json").read_text())
    assert best["step"] in [entry["step"] for entry in validations] and "exec_acc" in best["metrics"]

    rows = [json.loads(line) for line in (out / "val_generations" / f"step_{steps[-1]}.jsonl").read_text().splitlines()]
    assert len(rows) == 4   # --quick_test: 4 validation examples
    assert all({"step", "id", "completion", "total", "exact", "format", "exec_correct"} <= set(row) for row in rows)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["module"] == module
    for key in ("started_at", "finished_at", "duration_s", "command", "args", "config", "seed", "git", "versions",
                "device", "inputs", "outputs", "metrics"):
        assert key in manifest, f"manifest lacks {key}"
    assert {"train", "val", "policy_ckpt"} <= set(manifest["inputs"])
    assert all(len(entry["sha256"]) == 64 for entry in manifest["inputs"].values())
    assert {"final", "best", "training_log", "val_generations"} <= set(manifest["outputs"])
    assert manifest["config"]["algorithm"]["num_generations"] == 2     # --quick_test
    assert manifest["metrics"]["global_step"] == steps[-1]
    assert manifest["metrics"]["final_reward"] == pytest.approx(updates[-1]["reward"])
    assert manifest["metrics"]["peak_rss_gb"] == max(entry["peak_rss_gb"] for entry in updates)
    return updates



@pytest.mark.slow
def test_grpo_quick_test(grpo_run):
    updates = check_outputs(grpo_run, "06_grpo")
    # the reference is the SFT policy (TRL's frozen copy of the adapter), so at step 1, before any
    # update, the KL is exactly 0; against the base model it would be ~1e-4 with this adapter
    assert updates[0]["kl"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_rloo_quick_test_logs_rewards_and_loo_baselines(rloo_run):
    check_outputs(rloo_run, "07_rloo")
    rows = [json.loads(line) for line in (rloo_run / "logs" / "rloo_samples.jsonl").read_text().splitlines()]
    # 2 steps x (4 completions = 2 prompts x num_generations 2)
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4
    for start in range(0, len(rows), 2):
        group = rows[start:start + 2]
        assert group[0]["id"] == group[1]["id"] and group[0]["group"] == group[1]["group"]
        for row, other in ((group[0], group[1]), (group[1], group[0])):
            assert row["baseline"] == pytest.approx(other["reward"])   # k = 2: the other sample's reward
            # the total is the weighted sum of the components (the default spec's weights)
            weighted = sum(w * row["rewards"][name] for name, w in
                           (("exact", 1.0), ("numeric", 0.8), ("program", 0.3), ("format_error", -0.2)))
            assert row["reward"] == pytest.approx(weighted, abs=1e-6)


@pytest.mark.slow
def test_grpo_resume_continues_from_step_2(grpo_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(grpo_run, out)
    run_script(rl_command("06_train_grpo.py", grpo_run.parent, out, "--max_steps", "3", "--resume"))
    check_outputs(out, "06_grpo", steps=(1, 2, 3))
    assert (out / "trainer" / "checkpoint-3").is_dir()


def test_vllm_over_a_half_precision_base_needs_the_opt_in():
    from utils.config import ConfigError
    from utils.rl import check_vllm

    def cfg(dtype, use_vllm=True, allow=False):
        return {"model": {"dtype": dtype}, "algorithm": {"use_vllm": use_vllm, "vllm_allow_half_precision_merge": allow}}

    with pytest.raises(ConfigError, match="vllm_allow_half_precision_merge true"):
        check_vllm(cfg("bfloat16"))
    with pytest.raises(ConfigError, match="over a float16 base"):
        check_vllm(cfg("float16"))
    for allowed in (cfg("float32"), cfg("bfloat16", allow=True), cfg("bfloat16", use_vllm=False)):
        check_vllm(allowed)  # no error


# --- one forward pass per prompt -----------------------------------------------------------

@pytest.fixture(scope="module")
def lora_tiny(tmp_path_factory):
    """The tiny model with TRL's fused head at temperature 0.8 and a random (non-zero) LoRA."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from tests.fixtures.tiny_model import build_tiny_model
    from utils.modeling import load_model

    torch.manual_seed(0)
    model = load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")), dtype=torch.float32)
    add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


def grouped_rows(vocab: int, prompt_len=12, completion_len=6):
    """Six rows of two prompts (the second left-padded by 4), interleaved as TRL's shuffle leaves them, and
    their completions (the third padded after 4 tokens): (input_ids, attention_mask, completion_mask)."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (2, prompt_len), generator=generator)
    prompt_mask = torch.ones(2, prompt_len, dtype=torch.long)
    prompts[1, :4], prompt_mask[1, :4] = 0, 0
    order = torch.tensor([0, 1, 1, 0, 0, 1])
    completions = torch.randint(3, vocab, (6, completion_len), generator=generator)
    completion_mask = torch.ones(6, completion_len, dtype=torch.long)
    completion_mask[2, 4:] = 0
    return (torch.cat([prompts[order], completions], 1), torch.cat([prompt_mask[order], completion_mask], 1),
            completion_mask)


def test_shared_prompt_logps_equal_one_pass_per_row_with_their_gradients(lora_tiny):
    from utils.rl import shared_prompt_logps

    ids, mask, completion_mask = grouped_rows(lora_tiny.config.vocab_size)
    keep = completion_mask.size(1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    results = []
    for logps in (lambda: lora_tiny(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True),
                  lambda: shared_prompt_logps(lora_tiny, ids, mask, keep, compute_entropy=True)):
        out = logps()
        logp, entropy = (out.log_probs[:, -keep:], out.entropy[:, -keep:]) if hasattr(out, "log_probs") else out
        lora_tiny.zero_grad()
        (logp * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in lora_tiny.named_parameters() if p.requires_grad}
        results.append((logp.detach(), entropy.detach(), grads))
    (row_logp, row_entropy, row_grads), (shared_logp, shared_entropy, shared_grads) = results
    real = completion_mask.bool()
    assert torch.allclose(shared_logp[real], row_logp[real], atol=1e-5)
    assert torch.allclose(shared_entropy[real], row_entropy[real], atol=1e-5)
    assert row_logp[real].abs().min() > 1e-3  # real log-probs, not zeros that agree trivially
    for name, grad in row_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name
    distinct = torch.tensor([0, 1])  # no two rows share a prompt: nothing to share, TRL's pass instead
    assert shared_prompt_logps(lora_tiny, ids[distinct], mask[distinct], keep) is None


def test_shared_prompt_generation_samples_what_generate_samples(lora_tiny):
    from utils.rl import shared_prompt_generation

    ids, mask, _ = grouped_rows(lora_tiny.config.vocab_size)
    ids, mask = ids[:, :12], mask[:, :12]  # the prompts
    for sample in (False, True):
        options = dict(max_new_tokens=8, do_sample=sample, top_k=0, pad_token_id=0, eos_token_id=None)
        options.update(temperature=0.8) if sample else None
        torch.manual_seed(3)
        plain = lora_tiny.generate(input_ids=ids, attention_mask=mask, **options)
        with shared_prompt_generation(lora_tiny):
            assert "generate" in vars(lora_tiny)
            torch.manual_seed(3)
            shared = lora_tiny.generate(input_ids=ids, attention_mask=mask, **options)
        assert torch.equal(shared, plain), "sampled" if sample else "greedy"
    assert "generate" not in vars(lora_tiny)  # the class's generate again


def test_shared_prompt_trainer_falls_back_to_trl_only_where_nothing_is_shared(lora_tiny):
    import contextlib

    from utils.rl import SharedPromptForward

    class TRLPass:  # stands in for GRPOTrainer / RLOOTrainer: records the calls that reach TRL's own pass
        calls = []

        def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
            self.calls.append(input_ids.size(0))
            return torch.zeros(input_ids.size(0), args[1]), None, None

    trainer = type("Trainer", (SharedPromptForward, TRLPass), {})()
    trainer.args = SimpleNamespace(gradient_checkpointing=False)
    trainer.accelerator = SimpleNamespace(autocast=contextlib.nullcontext)
    ids, mask, completion_mask = grouped_rows(lora_tiny.config.vocab_size)
    keep = completion_mask.size(1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(lora_tiny, ids, mask, keep)
        assert TRLPass.calls == [] and logps[completion_mask.bool()].abs().min() > 0  # shared: every row scored, TRL's pass unused
        # chunks of 2: rows (0, 1) share no prompt, (2, 3) neither, (4, 5) neither -> TRL's pass on each chunk
        trainer._get_per_token_logps_and_entropies(lora_tiny, ids, mask, keep, batch_size=2)
        assert TRLPass.calls == [2, 2, 2]
        TRLPass.calls.clear()
        trainer._get_per_token_logps_and_entropies(lora_tiny, ids, mask, keep, pixel_values=torch.zeros(1))
        assert TRLPass.calls == [6]  # model inputs it does not handle: TRL's pass
