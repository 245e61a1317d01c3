"""One log vocabulary: the same scored batch, logged by PPO (utils.ppo.PPOTrainer.summarize) and as
TRL's GRPO and RLOO trainers log it from the reward functions 06 and 07 hand them, gives the same
`reward`, `reward_std` and `rewards/<name>/mean|std` (TRL's meaning: each function's unweighted
value; `reward` the weighted total), so curves from every method compare directly."""
import inspect
import json
import math

import pytest
import torch

from utils.rewards import RewardSpec, score
from utils.rl import reward_functions

TABLE = [["", "2018", "2017"], ["revenue", "$ 5,829", "$ 5,735"]]
EXAMPLE = {"id": "q", "table": TABLE, "exe_ans": 94.0, "target_program": "subtract(5829, 5735)",
           "target_answer": "94"}
COMPLETIONS = ['{"program": "subtract(5829, 5735)", "answer": "94"}',   # exact: 1.0 + 0.3 program
               '{"program": "subtract(5829, 5000)", "answer": "829"}',  # valid, wrong: partial program
               "the answer is 94",                                       # invalid format: -0.2
               '{"program": "add(5829, 5735)"}']                         # no answer key: invalid format
SPEC = RewardSpec(format=-0.5)  # a non-default weight: a weighted format term would read -0.25, not 0.5


def trl_record(spec: RewardSpec) -> dict:
    """What GRPOTrainer / RLOOTrainer log for the batch: rewards_per_func from the reward functions,
    rewards/<name>/mean and /std per column, reward = mean of the weighted row sums, reward_std its
    std (torch.std: n - 1, as TRL's nanstd)."""
    functions, weights = reward_functions(spec)
    columns = {key: [EXAMPLE[key]] * len(COMPLETIONS) for key in EXAMPLE}
    per_func = torch.tensor([function([[{"role": "assistant", "content": c}] for c in COMPLETIONS], **columns)
                             for function in functions]).T
    rewards = (per_func * torch.tensor(weights)).nansum(dim=1)
    record = {"reward": rewards.mean().item(), "reward_std": rewards.std().item()}
    for i, function in enumerate(functions):
        record[f"rewards/{function.__name__}/mean"] = per_func[:, i].mean().item()
        record[f"rewards/{function.__name__}/std"] = per_func[:, i].std().item()
    return record


def ppo_record(spec: RewardSpec) -> dict:
    """PPOTrainer.summarize's record for the same batch (one process)."""
    from accelerate import Accelerator

    from utils.ppo import PPOTrainer, Rollout, RunningMoments

    trainer = PPOTrainer.__new__(PPOTrainer)  # summarize needs only these
    trainer.accelerator, trainer.reward_moments = Accelerator(cpu=True), RunningMoments()
    n = len(COMPLETIONS)
    mask = torch.ones(n, 3)
    rollout = Rollout(query_response=torch.zeros(n, 5, dtype=torch.long), attention_mask=torch.ones(n, 5),
                      mask=mask, texts=COMPLETIONS, truncated=[False] * n)
    experience = {"rollout": rollout, "results": [score(c, EXAMPLE, spec) for c in COMPLETIONS],
                  "kl": torch.zeros(n, 3), "raw_advantages": torch.zeros(n, 3), "values": torch.zeros(n, 3),
                  "returns": torch.ones(n, 3)}
    stats = {name: [0.0] for name in ("policy_loss", "value_loss", "loss", "clipfrac", "value_clipfrac",
                                      "approx_kl", "entropy", "grad_norm", "early_stopped")}
    return trainer.summarize(experience, stats)


def test_ppo_logs_the_rewards_as_trl_does():
    trl, ppo = trl_record(SPEC), ppo_record(SPEC)
    names = [key for key in trl if key.startswith("reward")]
    assert names == ["reward", "reward_std", "rewards/exact/mean", "rewards/exact/std", "rewards/numeric/mean",
                     "rewards/numeric/std", "rewards/program/mean", "rewards/program/std",
                     "rewards/format_error/mean", "rewards/format_error/std"]
    assert {k: v for k, v in ppo.items() if k.startswith("reward")} == pytest.approx(trl)
    # hand-computed: totals 1.3, 0.3 x partial, -0.5, -0.5; half the batch has a format error
    assert ppo["rewards/format_error/mean"] == 0.5 and ppo["rewards/exact/mean"] == 0.25
    partial = ppo["rewards/program/mean"] * 4 - 1.0
    assert ppo["reward"] == pytest.approx((1.3 + 0.3 * partial - 1.0) / 4)


def test_undefined_explained_variance_is_logged_as_null(tmp_path):
    """All returns equal: explained variance is undefined; the log says null, not a made-up 0.0."""
    from utils.training import TrainingLog
    from utils.runs import read_json

    record = ppo_record(SPEC)
    assert math.isnan(record["ppo/explained_variance"])
    log = TrainingLog(tmp_path / "training_log.json")
    log.write([{**record, "step": 1}])
    assert read_json(tmp_path / "training_log.json")["log_history"][0]["ppo/explained_variance"] is None


def test_trl_logs_rewards_the_way_trl_record_assumes():
    """trl_record mirrors TRL's code; this fails loudly if a TRL upgrade changes it."""
    from trl import GRPOTrainer, RLOOTrainer

    for trainer in (GRPOTrainer, RLOOTrainer):
        source = inspect.getsource(trainer)
        for line in ('self._metrics[mode][f"rewards/{reward_func_name}/mean"].append(mean_rewards)',
                     'self._metrics[mode]["reward"].append(',
                     "(rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)"):
            assert line in source, f"{trainer.__name__}: {line!r} not found; re-check tests/test_log_names.py"


def test_training_log_writes_tensorboard_events_once(tmp_path):
    """The one log writer: JSON always, TensorBoard events with report_to tensorboard, each entry once
    (a resumed run's restored entries are not written again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.training import TrainingLog

    history = [{"step": 1, "loss": 0.5, "reward": 0.25}, {"step": 2, "loss": 0.4, "reward": None},
               {"step": 2, "val/exec_acc": 0.5}]
    TrainingLog(tmp_path / "a" / "training_log.json", "tensorboard").write(history)
    resumed = TrainingLog(tmp_path / "a" / "training_log.json", "tensorboard", logged=3)
    resumed.write([*history, {"step": 3, "loss": 0.3}])
    events = EventAccumulator(str(tmp_path / "a")).Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert [e.step for e in events.Scalars("reward")] == [1]          # null is not a point
    assert [e.value for e in events.Scalars("val/exec_acc")] == [0.5]
    TrainingLog(tmp_path / "b" / "training_log.json", "none").write(history)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["training_log.json"]   # report_to none: JSON only


def test_training_log_records_each_entrys_peak_memory(tmp_path):
    """Each new training entry gets the process's peak resident memory since the previous one: an array
    allocated (and freed) between two writes shows in the second entry's peak only, and the run's peak
    (what the manifests report) is the largest, a resumed run's restored entries included."""
    import numpy as np

    from utils.training import TrainingLog

    log, history = TrainingLog(tmp_path / "training_log.json"), [{"step": 1, "loss": 0.5}]
    log.write(history)
    block = np.ones(2**28 // 8)  # 256 MiB, touched
    del block
    history += [{"step": 2, "val/exec_acc": 0.5}, {"step": 2, "loss": 0.4}]
    log.write(history)
    log.write(history + [{"step": 3, "loss": 0.3}])
    written = json.loads((tmp_path / "training_log.json").read_text())["log_history"]
    first, second, third = (entry["peak_rss_gb"] for entry in written if "loss" in entry)
    assert "peak_rss_gb" not in history[1]                           # validation entries get none
    assert second >= first + 0.25 and second >= third + 0.25          # the block shows where it was held
    assert log.peak_rss_gb == second
    # a resumed run (a new process, its restored history) reports the peak of the whole training,
    # which here was before the resume, as its manifest's peak_rss_gb
    resumed = TrainingLog(tmp_path / "training_log.json", logged=len(written))
    resumed.write([*written, {"step": 4, "loss": 0.2}])
    assert resumed.peak_rss_gb == second
