"""03_sft_train.py (as subprocesses, on a tiny random model and synthetic data) and utils/training.py."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.tiny_model import build_tiny_model
from utils import config as config_lib
from utils import training
from utils.modeling import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "tokenizer_config.json")
# one thread: a tiny model gains nothing from two, and a shared CPU makes threads wait on each other
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama and synthetic processed data (01_prepare_dataset.py), built once."""
    base = tmp_path_factory.mktemp("sft")
    model = build_tiny_model(base / "tiny")
    done = subprocess.run([sys.executable, "01_prepare_dataset.py", "--dataset", "synthetic", "--num_examples", "40",
                           "--output_dir", str(base / "data"), "--paths.output_root", str(base / "outputs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    return SimpleNamespace(model=model, data=base / "data")


def sft(tiny, tmp_path, *args, run_id="sft", model=None, launcher=(sys.executable,)):
    """Run 03_sft_train.py from the repo root with small budgets; run folders go under tmp_path."""
    command = [*launcher, "03_sft_train.py", "--run_id", run_id,
               "--paths.output_root", str(tmp_path / "outputs"), "--paths.data_dir", str(tiny.data),
               "--max_train_examples", "8", "--batch_size", "2", "--training.logging_steps", "1",
               "--validation.num_samples", "2", "--validation.max_new_tokens", "8", *map(str, args)]
    if model is None:
        command += ["--model.name_or_path", str(tiny.model), "--model.dtype", "float32"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, env=ENV)


def read(path):
    return json.loads(Path(path).read_text())


def loss_steps(log):
    return [entry["step"] for entry in log["log_history"] if "loss" in entry]


# --- the script ---

def test_sft_writes_checkpoints_logs_samples_and_manifest(tiny, tmp_path):
    done = sft(tiny, tmp_path, "--max_steps", "4", "--validation.eval_steps", "2", "--training.save_steps", "2",
               "--save_merged")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "outputs" / "sft" / "03_sft"
    ckpt = folder / "ckpt_sft"
    for name in ("step_2", "step_4", "best", "final"):
        for file in ADAPTER_FILES:
            assert (ckpt / name / file).is_file(), f"{name}/{file}"
    assert (ckpt / "merged" / "config.json").is_file()                 # --save_merged: a plain model
    assert load_model(str(ckpt / "final"), dtype="float32") is not None  # adapter + base load back

    log = read(folder / "logs" / "training_log.json")
    assert list((folder / "logs").glob("events.out.tfevents.*"))  # TensorBoard beside it (report_to default)
    assert loss_steps(log) == [1, 2, 3, 4]
    train = [e for e in log["log_history"] if "loss" in e]
    assert all({"grad_norm", "learning_rate", "epoch", "train/tokens_per_s"} <= set(e) for e in train)
    assert all(math.isfinite(e["loss"]) and e["train/tokens_per_s"] > 0 for e in train)
    val = [e for e in log["log_history"] if "val/exec_acc" in e]
    assert [e["step"] for e in val] == [2, 4]                          # every eval_steps and at the end
    assert all({"eval_loss", "val/format_rate", "val/reward_mean", "val/reward_exact_mean"} <= set(e) for e in val)

    samples = read(folder / "valid_samples" / "step_2.json")
    assert samples["step"] == 2 and samples["metrics"]["n_examples"] == 2
    assert {"exec_acc", "format_rate", "reward_mean"} <= set(samples["metrics"])
    assert {"id", "completion", "total", "exact", "numeric", "program", "format", "category"} <= set(samples["samples"][0])
    best = read(ckpt / "best" / "validation.json")
    assert best["step"] in (2, 4) and "exec_acc" in best["metrics"]

    manifest = read(folder / "manifest.json")
    assert manifest["status"] == "complete"
    assert {"train", "val", "base_model"} <= set(manifest["inputs"])
    assert manifest["inputs"]["train"]["sha256"]
    assert {"final", "best", "training_log", "merged"} <= set(manifest["outputs"])
    metrics = manifest["metrics"]
    assert metrics["global_step"] == 4 and metrics["best_step"] == best["step"]
    assert metrics["dtype"] == "float32" and metrics["train_tokens_per_s"] > 0
    assert math.isfinite(metrics["train_loss_final"]) and metrics["best_val_exec_acc"] is not None
    assert manifest["config"]["training"]["max_steps"] == 4            # the resolved config


def test_sft_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    first = sft(tiny, tmp_path, "--max_steps", "2", "--validation.eval_steps", "2", "--training.save_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "outputs" / "sft" / "03_sft"
    assert (folder / "trainer" / "checkpoint-2").is_dir()
    second = sft(tiny, tmp_path, "--max_steps", "4", "--validation.eval_steps", "2", "--training.save_steps", "2",
                 "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "checkpoint-2" in second.stdout
    log = read(folder / "logs" / "training_log.json")
    assert loss_steps(log) == [1, 2, 3, 4]                             # steps 1-2 kept, 3-4 added once
    assert read(folder / "trainer" / "checkpoint-4" / "trainer_state.json")["global_step"] == 4
    assert {"step_2", "step_4", "best", "final"} <= {p.name for p in (folder / "ckpt_sft").iterdir()}


def test_sft_resume_without_checkpoint_fails_clearly(tiny, tmp_path):
    done = sft(tiny, tmp_path, "--max_steps", "2", "--resume")
    assert done.returncode != 0
    assert "--resume: no resumable checkpoint" in done.stderr


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    """A checkpoint without trainer_state.json (written last) was cut short by a kill: --resume skips it;
    --resume auto starts afresh when there is none."""
    trainer = tmp_path / "run" / "trainer"
    for step, complete in ((2, True), (10, True), (12, False)):
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert training.last_trainer_checkpoint(trainer) == str(trainer / "checkpoint-10")   # 10 > 2 as numbers
    assert training.prepare_folder(tmp_path / "run", ("logs",), "auto") == str(trainer / "checkpoint-10")
    (tmp_path / "fresh" / "logs").mkdir(parents=True)
    assert training.prepare_folder(tmp_path / "fresh", ("logs",), "auto") is None      # nothing to continue
    assert not (tmp_path / "fresh" / "logs").exists()                                   # a fresh run's clean-up
    with pytest.raises(FileNotFoundError, match="no resumable checkpoint"):
        training.prepare_folder(tmp_path / "fresh", ("logs",), "last")


def test_sft_stops_on_non_finite_loss(tiny, tmp_path):
    # a learning rate of 1e30 turns the LoRA weights to inf after one update, the loss to NaN
    done = sft(tiny, tmp_path, "--max_steps", "4", "--learning_rate", "1e30", "--training.warmup_ratio", "0",
               "--training.save_steps", "1", "--validation.eval_steps", "100", "--skip_validation")
    assert done.returncode == 1 and "Traceback" not in done.stderr   # a job that failed: one line, exit 1
    assert done.stderr.count("error: ") == 1 and "error: training stopped at step" in done.stderr
    step = int(done.stderr.split("training stopped at step ")[1].split(":")[0])
    ckpt = tmp_path / "outputs" / "sft" / "03_sft" / "ckpt_sft"
    assert not (ckpt / f"step_{step}").exists()                        # the broken state is never saved
    assert f"Last good checkpoint: {ckpt / f'step_{step - 1}'}" in done.stderr
    manifest = read(tmp_path / "outputs" / "sft" / "03_sft" / "manifest.json")
    assert manifest["status"] == "failed" and "NonFiniteLossError" in manifest["error"]


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="default model not materialized")
def test_sft_quick_test_on_default_model(tiny, tmp_path):
    done = subprocess.run([sys.executable, "03_sft_train.py", "--quick_test", "--run_id", "quick",
                           "--paths.output_root", str(tmp_path / "outputs"), "--paths.data_dir", str(tiny.data)],
                          cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "outputs" / "quick" / "03_sft"
    log = read(folder / "logs" / "training_log.json")
    assert loss_steps(log) == list(range(1, 13))
    assert [e["step"] for e in log["log_history"] if "val/exec_acc" in e] == [6, 12]
    assert read(folder / "manifest.json")["metrics"]["n_train_examples"] == 24
    assert (folder / "ckpt_sft" / "best" / "adapter_model.safetensors").is_file()


# --- utils/training.py ---

def test_completion_only_labels_end_with_eos(tiny):
    """TRL masks the prompt; the labels are the assistant's answer and its <|im_end|>."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    row = json.loads((tiny.data / "train.jsonl").read_text().splitlines()[0])
    tokenizer = load_tokenizer(str(tiny.model))
    cfg = config_lib.load(overrides=["--model.name_or_path", str(tiny.model), "--model.dtype", "float32"])
    trainer = SFTTrainer(model=load_model(str(tiny.model), dtype="float32"),
                         args=SFTConfig(**training.training_arguments(cfg, "/tmp/unused"), completion_only_loss=True),
                         train_dataset=Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]}]),
                         processing_class=tokenizer, peft_config=training.lora_config(cfg))
    labels = [t for t in trainer.train_dataset[0]["labels"] if t != -100]
    assert tokenizer.decode(labels).strip() == row["completion"][0]["content"] + "<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id in labels


@pytest.mark.parametrize("new, old, better", [
    ({"exec_acc": 0.5, "reward_mean": 0.1}, {"exec_acc": 0.25, "reward_mean": 0.9}, True),   # accuracy first
    ({"exec_acc": 0.5, "reward_mean": 0.4}, {"exec_acc": 0.5, "reward_mean": 0.3}, True),    # tie: reward breaks it
    ({"exec_acc": 0.5, "reward_mean": 0.3}, {"exec_acc": 0.5, "reward_mean": 0.3}, False),   # equal: keep the earlier
    ({"eval_loss": 1.2}, {"eval_loss": 1.5}, True),                                          # --skip_validation: lower loss
    ({"eval_loss": 0.1}, {"exec_acc": 0.0, "reward_mean": -0.2}, False),                     # generation metrics win
])
def test_best_checkpoint_ranking(new, old, better):
    assert (training.rank(new) > training.rank(old)) is better


def test_training_arguments_from_config():
    from trl import SFTConfig

    cfg = config_lib.load(overrides=["--model.dtype", "bfloat16", "--training.warmup_ratio", "0.1"])
    kwargs = training.training_arguments(cfg, "/tmp/unused", eval_steps=7)
    assert kwargs["bf16"] is True and kwargs["fp16"] is False          # fp32 master weights + bf16 autocast
    assert kwargs["warmup_steps"] == 0.1                               # transformers 5: a ratio below 1
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == 7
    assert kwargs["report_to"] == [] and kwargs["logging_nan_inf_filter"] is False
    args = SFTConfig(**kwargs)                                         # accepted here, CPU included
    assert args.bf16 and args.learning_rate == cfg["training"]["learning_rate"]
    assert training.mixed_precision(config_lib.load(overrides=["--model.dtype", "float32"]))["bf16"] is False
    with pytest.raises(config_lib.ConfigError, match="warmup_ratio"):
        training.training_arguments(config_lib.load(overrides=["--training.warmup_ratio", "3"]), "/tmp/unused")


def test_non_finite_guard_names_step_and_last_checkpoint(tmp_path):
    (tmp_path / "ckpt" / "step_4").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_8").mkdir()
    guard = training.NonFiniteGuard(tmp_path / "ckpt")
    state = SimpleNamespace(global_step=9)
    guard.on_log(None, state, None, logs={"loss": 2.5, "grad_norm": 1.0})  # finite: nothing happens
    with pytest.raises(training.NonFiniteLossError, match=r"step 9: loss is nan.*step_8"):
        guard.on_log(None, state, None, logs={"loss": float("nan")})
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(training.NonFiniteLossError, match="NaN/inf in the trainable weight weight"):
        guard.on_step_end(None, state, None, model=model)


def test_json_log_adds_tokens_per_s_and_writes_nan_as_null(tmp_path):
    log = training.JsonLogCallback(tmp_path / "log.json")
    state = SimpleNamespace(log_history=[], global_step=0, max_steps=2, is_world_process_zero=True)
    control = SimpleNamespace(should_log=False)
    for step, (tokens, loss) in enumerate([(100, 2.0), (300, float("nan"))], start=1):
        log.on_step_begin(None, state, control)
        log.train_time_s += 0.5                                        # as if the step took 0.5 s
        log.on_optimizer_step(None, state, control)
        state.global_step = step
        log.on_step_end(None, state, control)
        state.log_history.append({"loss": loss, "num_tokens": tokens, "step": step})
        log.on_log(None, state, control, logs={"loss": loss, "num_tokens": tokens})
    written = read(tmp_path / "log.json")["log_history"]
    assert [e["loss"] for e in written] == [2.0, None]                 # JSON has no NaN
    assert written[1]["train/tokens_per_s"] == pytest.approx(200 / 0.5, rel=0.05)
    assert control.should_log is True                                  # the last step is always logged
    assert log.tokens == 300 and log.tokens_per_s == pytest.approx(300 / 1.0, rel=0.05)


def test_save_policy_is_loadable_and_portable(tiny, tmp_path):
    from peft import get_peft_model

    cfg = config_lib.load(overrides=["--model.name_or_path", str(tiny.model)])
    model = get_peft_model(load_model(str(tiny.model), dtype="float32"), training.lora_config(cfg))
    folder = training.save_policy(model, load_tokenizer(str(tiny.model)), cfg, tmp_path / "ckpt" / "step_1",
                                  {"step": 1, "metrics": {"exec_acc": 0.5}})
    assert {p.name for p in folder.iterdir()} >= {*ADAPTER_FILES, "validation.json"}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    assert config_lib.load(folder / "config.yaml")["model"]["name_or_path"] == str(tiny.model)
    assert load_model(str(folder), dtype="float32").config.hidden_size == 64
    training.save_policy(model, None, cfg, folder)                     # overwrite in place
    assert not (folder / "validation.json").exists()


def test_quick_test_defaults_yield_to_explicit_flags():
    spec = importlib.util.spec_from_file_location("sft_script", REPO / "03_sft_train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args, extra = script.parse_args(["--quick_test", "--max_steps", "6", "--validation.num_samples", "3"])
    cfg = config_lib.from_args(args, extra, script.QUICK_TEST)
    assert cfg["training"]["max_steps"] == 6 and cfg["validation"]["num_samples"] == 3   # explicit flags win
    assert cfg["validation"]["eval_steps"] == 6 and cfg["validation"]["max_new_tokens"] == 48
