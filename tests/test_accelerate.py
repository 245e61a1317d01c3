"""Multi-process training: every trainer (03, 05, 06, 07, 09) under `accelerate launch` with two CPU
processes (gloo) writes what one process writes (one manifest, one log with the validation, best chosen
from it), and the configs/accelerate/*.yaml examples parse as accelerate configs."""
import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_dpo import inputs as dpo_inputs  # noqa: F401 (fixtures)
from tests.test_dpo import run09
from tests.test_grpo_rloo import check_outputs, rl_command
from tests.test_ppo import ppo_command, ppo_inputs, run_script  # noqa: F401 (ppo_inputs is a fixture)
from tests.test_sft import sft, tiny  # noqa: F401 (tiny is a fixture)

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def free_port() -> int:
    """A port nobody listens on, so parallel test runs do not share accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name, distributed_type, processes", [
    ("single_gpu", "NO", 1),
    ("multi_gpu_ddp", "MULTI_GPU", 2),          # 2 is a placeholder: the number of GPUs
    ("deepspeed_zero2", "DEEPSPEED", 2),
    ("deepspeed_zero3", "DEEPSPEED", 2),
    ("cpu_2proc", "MULTI_GPU", 2),              # torchrun launcher; gloo on CPU at run time (see the file)
])
def test_accelerate_configs_load(name, distributed_type, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == distributed_type and config.num_processes == processes
    if distributed_type == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-1])
        # left to 'auto', DeepSpeed takes them from the training config instead of overriding it
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(raw["deepspeed_config"])


def two_processes() -> tuple:
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port()))


def check_one_writer(out: Path, stdout: str, report: str = "done: final") -> dict:
    """What a single process would have written: one report, one manifest that counts both processes,
    validation in the log, and best chosen from that validation (not a copy of final)."""
    assert stdout.count(report) == 1, stdout[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["num_processes"] == 2
    log = json.loads((out / "logs" / "training_log.json").read_text())["log_history"]
    validations = [entry["step"] for entry in log if "val/exec_acc" in entry]
    assert validations, "the training log lost the main process's validation entries"
    best = json.loads(next(out.glob("ckpt_*/best/validation.json")).read_text())
    assert best["step"] in validations and manifest["metrics"]["best_step"] == best["step"]
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer
    return manifest


def test_sft_with_two_cpu_processes(tiny, tmp_path):  # noqa: F811
    done = sft(tiny, tmp_path, "--max_steps", "2", "--validation.eval_steps", "2", "--training.save_steps", "2",
               launcher=two_processes())
    assert done.returncode == 0, done.stderr[-3000:]
    check_one_writer(tmp_path / "outputs" / "sft" / "03_sft", done.stdout)


@pytest.mark.parametrize("script, module", [("06_train_grpo.py", "06_grpo"), ("07_train_rloo.py", "07_rloo")])
def test_grpo_rloo_with_two_cpu_processes(ppo_inputs, tmp_path, script, module):  # noqa: F811
    out = tmp_path / module
    done = run_script(rl_command(script, ppo_inputs, out), launcher=two_processes())
    check_one_writer(out, done.stdout)
    check_outputs(out, module)


def test_dpo_with_two_cpu_processes(dpo_inputs, tmp_path):  # noqa: F811
    out = tmp_path / "dpo"
    done = run09(dpo_inputs, out, launcher=two_processes())
    assert done.returncode == 0, done.stderr[-3000:]
    check_one_writer(out, done.stdout, report="DPO: ")


def test_ppo_quick_test_with_two_cpu_processes(ppo_inputs, tmp_path):  # noqa: F811
    out = tmp_path / "two_processes"
    done = run_script(ppo_command(ppo_inputs, out), launcher=two_processes())
    assert done.stdout.count("PPO: ") == 1  # only the main process reports (and writes)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["num_processes"] == 2
    for key in ("module", "started_at", "finished_at", "duration_s", "command", "args", "config", "seed",
                "git", "versions", "device", "inputs", "outputs", "metrics"):
        assert key in manifest, f"manifest lacks {key}"
    log = json.loads((out / "logs" / "training_log.json").read_text())["log_history"]
    updates = [entry for entry in log if "ppo/value_loss" in entry]
    assert [entry["step"] for entry in updates] == [1, 2]
    # 4 prompts per step over 2 processes: the gathered metrics cover all 4 completions
    assert all(entry["completions/mean_length"] > 0 for entry in updates)
    assert (out / "ckpt_ppo" / "final" / "value_head.pt").is_file()
    assert (out / "val_generations" / "step_2.jsonl").is_file()


def test_zero3_is_refused_in_one_line(monkeypatch):
    from utils import training
    from utils.cli import UsageError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UsageError, match="ZeRO-3 is not supported.*deepspeed_zero2.yaml"):
        training.process_state()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert training.process_state().num_processes == 1   # ZeRO-2 keeps the weights whole: allowed
