"""Multi-process training: 05_train_ppo.py under `accelerate launch` with two CPU processes (gloo),
and the configs/accelerate/*.yaml examples parse as accelerate configs."""
import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_ppo import ppo_command, ppo_inputs, run_script  # noqa: F401 (ppo_inputs is a fixture)

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


def test_ppo_quick_test_with_two_cpu_processes(ppo_inputs, tmp_path):  # noqa: F811
    out = tmp_path / "two_processes"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port()))
    done = run_script(ppo_command(ppo_inputs, out), launcher=launcher)
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
