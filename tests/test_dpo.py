"""09_train_dpo.py as a subprocess on a tiny random model with an SFT LoRA adapter (made with peft
directly) and a handful of hand-written preference pairs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.data import build_prompt, canonical_response
from utils.runs import atomic_write_jsonl

REPO = Path(__file__).resolve().parents[1]
# one thread: a tiny model gains nothing from two, and a shared CPU makes threads wait on each other
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TABLE = [["", "2018", "2017"], ["revenue", "$ 5,829", "$ 5,735"]]
EXAMPLES = [  # (id, question, gold program, exe_ans, answer text)
    ("q0", "what was the change in revenue ?", "subtract(5829, 5735)", 94.0, "94"),
    ("q1", "what was the growth rate of revenue ?", "subtract(5829, 5735), divide(#0, 5735)", 0.01639, "1.6%"),
    ("q2", "was revenue higher in 2018 ?", "greater(5829, 5735)", "yes", "yes"),
    ("q3", "what was total revenue in both years ?", "add(5829, 5735)", 11564.0, "11564"),
    ("q4", "what was the ratio of revenue ?", "divide(5829, 5735)", 1.01639, "1.02"),
]
CONTEXT = "revenue : $ 5,829 in 2018 ; $ 5,735 in 2017"


def processed(id_, question, program, exe_ans, answer):
    return {"id": id_, "split": "val", "prompt": build_prompt(question, CONTEXT),
            "completion": [{"role": "assistant", "content": canonical_response(program, answer)}],
            "table": TABLE, "exe_ans": exe_ans, "target_program": program, "target_answer": answer}


def pair(id_, question, program, answer, rejected):
    return {"id": id_, "prompt": build_prompt(question, CONTEXT),
            "chosen": [{"role": "assistant", "content": canonical_response(program, answer)}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "reward_chosen": 1.3, "reward_rejected": -0.2, "margin": 1.5}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny base model, an SFT adapter on it (nonzero, so merging it matters), pairs and val data."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fixtures.tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("dpo")
    base = build_tiny_model(tmp / "tiny")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    sft = tmp / "03_sft" / "ckpt_sft" / "best"
    model.save_pretrained(sft)
    AutoTokenizer.from_pretrained(base).save_pretrained(sft)

    pairs = [pair(id_, q, program, answer, rejected) for id_, q, program, _, answer in EXAMPLES
             for rejected in ("no idea", '{"program": "add(1, 2)", "answer": "3"}')]
    atomic_write_jsonl(tmp / "pairs.jsonl", pairs)
    atomic_write_jsonl(tmp / "val.jsonl", [processed(*example) for example in EXAMPLES])
    atomic_write_jsonl(tmp / "data" / "train.jsonl", [processed(*example) for example in EXAMPLES])
    (tmp / "empty.jsonl").write_text("")
    return tmp


def run09(inputs, out, *args, pairs="pairs.jsonl", quick_test=True, launcher=(sys.executable,)):
    command = [*launcher, "09_train_dpo.py", "--base_or_sft_ckpt", inputs / "03_sft", "--pairs",
               inputs / pairs, "--val_jsonl", inputs / "val.jsonl", "--output_dir", out,
               "--run_id", "pytest", "--paths.output_root", inputs / "outputs",
               "--training.per_device_train_batch_size", "2", "--training.gradient_accumulation_steps", "1",
               *(["--quick_test"] if quick_test else []), *args]
    return subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)


@pytest.fixture(scope="module")
def trained(inputs):
    out = inputs / "09_dpo"
    done = run09(inputs, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def test_checkpoints(trained):
    from utils.modeling import load_model

    for name in ("final", "best", "step_1", "step_2"):
        folder = trained / "ckpt_dpo" / name
        for file in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "tokenizer_config.json"):
            assert (folder / file).is_file(), f"{name}/{file}"
    assert (trained / "trainer" / "checkpoint-2" / "trainer_state.json").is_file()   # resumable
    # the trained SFT adapter names the base model, so it loads like the SFT checkpoint; TRL's frozen
    # "ref" copy (the reference, tests/test_reference.py) is not saved with it
    base = json.loads((trained / "ckpt_dpo" / "final" / "adapter_config.json").read_text())
    assert Path(base["base_model_name_or_path"]).resolve() == (trained.parent / "tiny").resolve()
    assert not (trained / "ckpt_dpo" / "final" / "ref").exists() and not (trained / "reference_model").exists()
    assert load_model(str(trained / "ckpt_dpo" / "final"), dtype="float32") is not None


def test_training_log(trained):
    log = json.loads((trained / "logs" / "training_log.json").read_text())["log_history"]
    assert list((trained / "logs").glob("events.out.tfevents.*"))  # TensorBoard beside it (report_to default)
    train = [entry for entry in log if "loss" in entry]
    assert [entry["step"] for entry in train] == [1, 2]
    for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                 "logps/rejected", "kl", "grad_norm", "learning_rate"):
        assert name in train[-1], name
    assert train[0]["kl"] == 0.0 and train[0]["rewards/margins"] == 0.0   # step 1 starts at the reference
    assert any("eval_rewards/accuracies" in entry for entry in log)      # the held-out pairs at eval_steps
    val = [entry for entry in log if "val/exec_acc" in entry]
    assert [entry["step"] for entry in val] == [2]
    rows = [json.loads(line) for line in (trained / "val_generations" / "step_2.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"step", "completion", "total", "exec_correct"} <= set(rows[0])


def test_metrics_and_manifest(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["inputs"]) >= {"pairs", "val", "policy_ckpt"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["inputs"].values())
    assert set(manifest["outputs"]) >= {"ckpt_final", "ckpt_best", "training_log", "metrics"}
    assert manifest["config"]["algorithm"]["name"] == "dpo" and manifest["config"]["training"]["max_steps"] == 2
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics == {k: v for k, v in manifest["metrics"].items() if k in metrics}
    # 5 prompts, holdout_fraction 0.1 -> round(0.5) = 0, raised to the minimum of one prompt (2 pairs)
    assert (metrics["holdout_n_prompts"], metrics["holdout_n_pairs"]) == (1, 2)
    for name in ("holdout_pref_acc_before", "holdout_pref_acc_after", "holdout_logp_acc_after"):
        assert metrics[name] in (0.0, 0.5, 1.0), name
    assert metrics["global_step"] == 2 and "val/exec_acc" in metrics
    # per pair, so that a benchmark can bootstrap over prompts: they agree with the accuracies
    assert len(metrics["holdout_pair_prompt_ids"]) == len(metrics["holdout_logp_correct_after"]) == 2
    assert sum(metrics["holdout_logp_correct_before"]) / 2 == metrics["holdout_pref_acc_before"]
    assert sum(metrics["holdout_logp_correct_after"]) / 2 == metrics["holdout_logp_acc_after"]


def test_holdout_pairs_from_other_prompts(inputs, tmp_path):
    """--holdout_pairs: every --pairs pair trains, the file's pairs (prompts training never saw) are held out;
    a file that shares a prompt with the training pairs is refused, before any training."""
    pairs = [json.loads(line) for line in (inputs / "pairs.jsonl").read_text().splitlines()]
    train = [p for p in pairs if p["id"] in ("q0", "q1", "q2")]
    atomic_write_jsonl(tmp_path / "train.jsonl", train)
    atomic_write_jsonl(tmp_path / "held.jsonl", [p for p in pairs if p["id"] in ("q3", "q4")])
    done = run09(inputs, tmp_path / "out", "--holdout_pairs", tmp_path / "held.jsonl", "--max_steps", 1,
                 pairs=tmp_path / "train.jsonl")
    assert done.returncode == 0, done.stderr[-5000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["holdout_n_prompts"], metrics["holdout_n_pairs"]) == (2, 4)
    assert metrics["holdout_pair_prompt_ids"] == ["q3", "q3", "q4", "q4"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["train_pairs"] == 6 and "holdout_pairs" in manifest["inputs"]

    atomic_write_jsonl(tmp_path / "overlap.jsonl", [p for p in pairs if p["id"] in ("q2", "q3")])
    done = run09(inputs, tmp_path / "out2", "--holdout_pairs", tmp_path / "overlap.jsonl", pairs=tmp_path / "train.jsonl")
    assert done.returncode == 2 and "shares 1 prompts" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out2" / "ckpt_dpo").exists()


def test_resume(trained, inputs, tmp_path):
    out = tmp_path / "09_dpo"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "trainer" / "checkpoint-2")   # as if the run had stopped after step 1
    done = run09(inputs, out, "--resume", "--max_steps", 3)
    assert done.returncode == 0, done.stderr[-5000:]
    log = json.loads((out / "logs" / "training_log.json").read_text())["log_history"]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3]
    assert (out / "ckpt_dpo" / "step_3" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["inputs"]["resume"]["path"].endswith("checkpoint-1")


def test_resume_without_checkpoint(inputs, tmp_path):
    done = run09(inputs, tmp_path / "out", "--resume")
    assert done.returncode == 2 and "--resume: no resumable checkpoint" in done.stderr


def test_no_pairs(inputs, tmp_path):
    done = run09(inputs, tmp_path / "out", pairs="empty.jsonl", quick_test=False)
    assert done.returncode == 2 and "empty.jsonl holds no pairs" in done.stderr


def test_no_pairs_quick_test_smoke_runs_on_gold_pairs(inputs, tmp_path):
    # a smoke-sized SFT policy writes no valid JSON, so 08 finds no pairs: --quick_test still runs
    done = run09(inputs, tmp_path / "out", "--paths.data_dir", inputs / "data", "--max_steps", 1,
                 "--validation.num_samples", 1, pairs="empty.jsonl")
    assert done.returncode == 0, done.stderr[-5000:]
    assert "WARNING: quick_test smoke pairs" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["pairs_source"].startswith("quick_test smoke pairs")
    assert "smoke_pairs_from" in manifest["inputs"]


def test_missing_pairs(inputs, tmp_path):
    done = subprocess.run([sys.executable, "09_train_dpo.py", "--base_or_sft_ckpt", str(inputs / "03_sft"),
                           "--pairs", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 2
    assert "none.jsonl not found" in done.stderr and "python 08_build_prefs.py" in done.stderr
