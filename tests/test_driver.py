"""12_driver.py: the plan, skip rule, resume rule and README of utils/driver.py, by hand.

The whole pipeline on a tiny model (every stage's files, the rerun that skips them all, kills and reruns,
same-seed runs) is in tests/test_kill_resume.py.
"""
import time
from pathlib import Path

import pytest

from utils import driver
from utils.driver import Options, PlanError, Stage

CFG = "configs/models/smollm2-135m.yaml"


def opts(**changes) -> Options:
    base = dict(methods=driver.METHODS, seeds=(42,), run_id="r1", config=CFG, output_root="out",
                data_dir="data", config_files=(CFG,),
                algo_files={m: f"configs/algorithms/{m}.yaml" for m in driver.METHODS})
    return Options(**{**base, **changes})


def names(stages) -> list[str]:
    return [s.name for s in stages]


def by_name(stages) -> dict[str, Stage]:
    return {s.name: s for s in stages}


# --- command line ---
@pytest.mark.parametrize("method, expected", [
    ("all", ("ppo", "grpo", "rloo", "dpo")),   # every method, in script order
    ("grpo", ("grpo",)),                       # one
])
def test_expand_methods(method, expected):
    assert driver.expand_methods(method) == expected


def test_expand_methods_rejects_unknown():
    with pytest.raises(PlanError, match="--method 'sac'.*ppo, grpo, rloo, dpo or all"):
        driver.expand_methods("sac")


@pytest.mark.parametrize("tokens, common, algorithm", [
    ([], [], []),                                                          # nothing to pass
    (["--training.learning_rate", "1e-5"], ["--training.learning_rate", "1e-5"], []),   # flag and value
    (["--lora.r=8"], ["--lora.r=8"], []),                                  # --key=value is one token
    (["--algorithm.beta", "0.2", "--max_steps", "1"], ["--max_steps", "1"], ["--algorithm.beta", "0.2"]),
    (["--training.max_steps", "-1"], ["--training.max_steps", "-1"], []),  # a negative value is a value
    (["--algorithm.beta=0.2"], [], ["--algorithm.beta=0.2"]),              # --algorithm.* go to the methods
])
def test_split_overrides(tokens, common, algorithm):
    assert driver.split_overrides(tokens) == (common, algorithm)


@pytest.mark.parametrize("tokens, match", [
    (["oops"], "unexpected argument 'oops'"),             # a bare word
    (["--seed", "3"], "use --seeds"),                     # the driver seeds each stage
    (["--training.seed=3"], "use --seeds"),
    (["--output_dir", "x"], "use --run_id and paths.output_root"),  # the driver names the folders
])
def test_split_overrides_rejects(tokens, match):
    with pytest.raises(PlanError, match=match):
        driver.split_overrides(tokens)


@pytest.mark.parametrize("tokens, expected", [
    ([], None),                                                        # not given
    (["--paths.data_dir", "a"], "a"),                                  # --key value
    (["--paths.data_dir=b"], "b"),                                     # --key=value
    (["--paths.data_dir", "a", "--paths.data_dir=c"], "c"),            # the last one wins, as in utils.config
    (["--paths.data_dirx", "a"], None),                                # another key
])
def test_override_value(tokens, expected):
    assert driver.override_value(tokens, "paths.data_dir") == expected


# --- plan ---
def test_plan_all_methods_one_seed():
    stages = driver.plan(opts())
    assert names(stages) == [
        "00_data_validation", "01_preprocessing", "02_rewards", "03_sft", "04_candidates", "08_preferences",
        "05_ppo", "06_grpo", "07_rloo", "09_dpo",
        "10_eval_base", "10_eval_sft", "10_eval_ppo", "10_eval_grpo", "10_eval_rloo", "10_eval_dpo",
        "11_comparison"]
    s = by_name(stages)
    # DESIGN.md's folders for a single seed
    assert s["03_sft"].folder == "out/r1/03_sft" and s["06_grpo"].folder == "out/r1/06_grpo"
    assert s["10_eval_grpo"].folder == "out/r1/10_evaluation/grpo"
    assert s["01_preprocessing"].manifest == "out/r1/01_preprocessing/manifest.json"
    # each method starts from the seed's SFT folder; DPO from the pairs of 08
    assert s["06_grpo"].args[:4] == ("--policy_ckpt", "out/r1/03_sft", "--output_dir", "out/r1/06_grpo")
    assert s["09_dpo"].args[:4] == ("--base_or_sft_ckpt", "out/r1/03_sft", "--pairs",
                                    "out/r1/08_preferences/pairs.jsonl")
    assert s["04_candidates"].args[:2] == ("--policy_ckpt", "out/r1/03_sft")
    assert s["08_preferences"].args[:2] == ("--candidates_dir", "out/r1/04_candidates")
    # evaluations name their policy; the base model has no checkpoint
    assert "--policy_ckpt" not in s["10_eval_base"].args
    assert s["10_eval_ppo"].args[:4] == ("--policy_ckpt", "out/r1/05_ppo", "--policy_name", "ppo")
    # the comparison reads exactly the six metrics files
    metrics = [a for a in s["11_comparison"].args if a.endswith("metrics.json")]
    assert metrics == [f"out/r1/10_evaluation/{p}/metrics.json" for p in ("base", "sft", "ppo", "grpo", "rloo", "dpo")]
    for stage in stages:
        assert stage.args[stage.args.index("--run_id") + 1] == "r1"
        assert stage.args[stage.args.index("--config") + 1] == CFG
        assert stage.inputs[0] == CFG                       # the model config is every stage's input


def test_launcher_runs_the_training_stages_only():
    launcher = ("accelerate", "launch", "--config_file", "configs/accelerate/multi_gpu_ddp.yaml")
    s = by_name(driver.plan(opts(launcher=launcher)))
    trained = {name for name, stage in s.items() if stage.launcher}
    assert trained == {"03_sft", "05_ppo", "06_grpo", "07_rloo", "09_dpo"}
    assert s["06_grpo"].command.startswith("accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml "
                                           "06_train_grpo.py --policy_ckpt")
    assert s["10_eval_grpo"].command.startswith("python 10_evaluate.py")
    # the launcher is not part of the command line a completed stage is compared on
    assert s["06_grpo"].argv == by_name(driver.plan(opts()))["06_grpo"].argv


def test_plan_without_dpo_has_no_candidates_or_pairs():
    assert names(driver.plan(opts(methods=("grpo",)))) == [
        "00_data_validation", "01_preprocessing", "02_rewards", "03_sft", "06_grpo",
        "10_eval_base", "10_eval_sft", "10_eval_grpo", "11_comparison"]


def test_plan_several_seeds_suffixes_folders_and_policies():
    stages = driver.plan(opts(methods=("grpo", "dpo"), seeds=(1, 2)))
    assert names(stages) == [
        "00_data_validation", "01_preprocessing", "02_rewards",
        "03_sft_seed1", "04_candidates_seed1", "08_preferences_seed1", "06_grpo_seed1", "09_dpo_seed1",
        "03_sft_seed2", "04_candidates_seed2", "08_preferences_seed2", "06_grpo_seed2", "09_dpo_seed2",
        "10_eval_base", "10_eval_sft_seed1", "10_eval_grpo_seed1", "10_eval_dpo_seed1",
        "10_eval_sft_seed2", "10_eval_grpo_seed2", "10_eval_dpo_seed2", "11_comparison"]
    s = by_name(stages)
    # SFT once per seed, shared by that seed's methods
    assert s["06_grpo_seed2"].args[:4] == ("--policy_ckpt", "out/r1/03_sft_seed2", "--output_dir", "out/r1/06_grpo_seed2")
    assert s["09_dpo_seed1"].args[3] == "out/r1/08_preferences_seed1/pairs.jsonl"
    # policy names as 11_compare_runs parses them (grpo_seed2 -> grpo, seed 2)
    assert s["10_eval_grpo_seed2"].args[:4] == ("--policy_ckpt", "out/r1/06_grpo_seed2", "--policy_name", "grpo_seed2")
    # seeds reach the seed-specific stages only; data, rewards and the base evaluation are shared
    for stage in stages:
        seed = stage.args[stage.args.index("--seed") + 1] if "--seed" in stage.args else None
        assert seed == (str(stage.seed) if stage.seed is not None else None)
    assert s["03_sft_seed2"].seed == 2 and s["10_eval_base"].seed is None and s["02_rewards"].seed is None


def test_plan_flags_reach_the_right_stages():
    stages = driver.plan(opts(methods=("dpo",), quick_test=True, algo_config="my_dpo.yaml",
                              overrides=("--training.max_steps", "1"), algo_overrides=("--algorithm.beta", "0.3"),
                              algo_files={"dpo": "my_dpo.yaml"}))
    s = by_name(stages)
    for stage in stages:
        assert ("--quick_test" in stage.args) == (stage.script in driver.QUICK_TEST_SCRIPTS)
        algo = stage.name in ("08_preferences", "09_dpo")   # 08 reads algorithm.min_margin
        assert ("--algo_config" in stage.args) == algo and ("my_dpo.yaml" in stage.inputs) == algo
        # overrides come last, so they win over the driver's own flags
        tail = ("--training.max_steps", "1", "--algorithm.beta", "0.3") if algo else ("--training.max_steps", "1")
        assert stage.args[-len(tail):] == tail
    assert "--quick_test" in s["01_preprocessing"].args and "--quick_test" not in s["02_rewards"].args


def test_plan_synthetic_has_no_raw_check():
    stages = driver.plan(opts(methods=("ppo",), dataset="synthetic", data_dir="datasets/synthetic_processed"))
    assert names(stages)[:2] == ["01_preprocessing", "02_rewards"]
    assert stages[0].args[:6] == ("--dataset", "synthetic", "--context_mode", "retrieved",
                                  "--output_dir", "datasets/synthetic_processed")


def test_plan_ladder_levels_and_recipe_flags():
    flags = driver.recipe_flags({"sft": {"training.max_steps": 40}, "grpo": {"learning_rate": 1e-4},
                                 "evaluate": {"num_samples": 4, "quick": True, "off": False},
                                 "data": {"levels": [1, 2]}}, "r.yaml")
    assert flags == {"sft": ("--training.max_steps", "40"), "grpo": ("--learning_rate", "0.0001"),
                     "evaluate": ("--num_samples", "4", "--quick"), "data": ("--levels", "1", "2")}
    stages = driver.plan(opts(methods=("grpo", "dpo"), dataset="synthetic", levels=(1,), num_examples=500,
                              stage_flags={k: v for k, v in flags.items() if k != "data"}, evaluate_base=False,
                              overrides=("--training.max_steps", "7")))
    s = by_name(stages)
    assert s["01_preprocessing"].args[6:10] == ("--levels", "1", "--num_examples", "500")
    # a recipe's stage flags come before the command line's overrides, which win
    assert s["03_sft"].args[-4:] == ("--training.max_steps", "40", "--training.max_steps", "7")
    assert "--learning_rate" in s["06_grpo"].args and "--learning_rate" not in s["09_dpo"].args
    evaluations = [stage for stage in stages if stage.script == "10_evaluate.py"]
    assert [e.name for e in evaluations] == ["10_eval_sft", "10_eval_grpo", "10_eval_dpo"]  # no base
    assert all(e.args[-5:-2] == ("--num_samples", "4", "--quick") for e in evaluations)


@pytest.mark.parametrize("stages, match", [
    ({"sft": {"x": 1}, "nope": {}}, "unknown: nope"),
    ({"sft": 3}, "stages.sft must map flags"),
    ([1], "stages must map"),
])
def test_recipe_flags_reject(stages, match):
    with pytest.raises(PlanError, match=match):
        driver.recipe_flags(stages, "r.yaml")


def test_driver_recipe_dry_run_and_errors(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "12_driver.py", "--recipe", "ladder_cpu", "--dry_run", "--paths.output_root",
               str(tmp_path / "out")]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "run ladder_cpu: 15 stages" in done.stdout and "10_eval_base" not in done.stdout
    assert "--levels 1 --num_examples 1250" in done.stdout and "--paths.data_dir datasets/ladder_cpu" in done.stdout
    bad = tmp_path / "bad.yaml"
    for text, message in (("driver: {nope: 1}", "unknown: nope"), ("stages: {sft: 3}", "stages.sft"),
                          (": : :", "not valid YAML")):
        bad.write_text(text)
        done = subprocess.run([sys.executable, "12_driver.py", "--recipe", str(bad), "--dry_run"], cwd=repo,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "12_driver.py", "--recipe", "no_such", "--dry_run"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "recipes: ladder_cpu" in done.stderr


def test_plan_finqa_passes_data_root_and_context_mode():
    s = by_name(driver.plan(opts(methods=("ppo",), data_root="raw", context_mode="gold")))
    assert s["00_data_validation"].args[:2] == ("--data_root", "raw")
    assert s["01_preprocessing"].args[:8] == ("--data_root", "raw", "--dataset", "finqa", "--context_mode", "gold",
                                              "--output_dir", "data")


@pytest.mark.parametrize("changes, match", [
    (dict(methods=("ppo", "grpo"), algo_config="x.yaml"), "single --method"),       # one method's hyperparameters
    (dict(methods=("ppo", "grpo"), algo_overrides=("--algorithm.beta", "1")), "single --method"),
    (dict(seeds=(1, 1)), "each seed once"),
    (dict(seeds=()), "at least one"),
])
def test_plan_rejects(changes, match):
    with pytest.raises(PlanError, match=match):
        driver.plan(opts(**changes))


@pytest.mark.parametrize("targets, expected", [
    (["03_sft"], {"03_sft_seed1", "03_sft_seed2"}),               # a name without its seed: every seed
    (["03_sft_seed2"], {"03_sft_seed2"}),                         # one stage
    (["10"], {"10_eval_base", "10_eval_sft_seed1", "10_eval_grpo_seed1", "10_eval_sft_seed2",
              "10_eval_grpo_seed2"}),                             # a script number: all its stages
    (["02_rewards", "11_comparison"], {"02_rewards", "11_comparison"}),  # repeatable
    ([], set()),
])
def test_select_forced(targets, expected):
    stages = driver.plan(opts(methods=("grpo",), seeds=(1, 2)))
    assert driver.select_forced(stages, targets) == expected


def test_select_forced_rejects_unknown():
    with pytest.raises(PlanError, match="--force 05_ppo: no such stage"):
        driver.select_forced(driver.plan(opts(methods=("grpo",))), ["05_ppo"])


# --- skip rule ---
STAGE = Stage("03_sft", "03_sft_train.py", ("--seed", "1"), "out/r1/03_sft", "out/r1/03_sft/manifest.json", "SFT")
SHAS = {"data/train.jsonl": "aaa", "cfg.yaml": "ccc"}
RECORD = {"status": "complete", "argv": ["03_sft_train.py", "--seed", "1"], "finished_at": "T1",
          "inputs": dict(SHAS), "outputs": ["out/r1/03_sft/ckpt_sft"], "outputs_fingerprint": "fp"}
MANIFEST = {"status": "complete", "finished_at": "T1"}


@pytest.mark.parametrize("record, manifest, forced, shas, fingerprint, run, why", [
    (RECORD, MANIFEST, False, SHAS, "fp", False, "complete; command, inputs"),      # all unchanged: skip
    (RECORD, MANIFEST, True, SHAS, "fp", True, "forced"),                            # --force
    (None, MANIFEST, False, SHAS, "fp", True, "not run yet"),                        # never run by the driver
    ({**RECORD, "status": "failed"}, MANIFEST, False, SHAS, "fp", True, "did not complete (failed)"),       # failed last time
    ({**RECORD, "status": "interrupted"}, MANIFEST, False, SHAS, "fp", True, "did not complete (interrupted)"),
    (RECORD, None, False, SHAS, "fp", True, "manifest.json is missing"),             # folder deleted
    (RECORD, {**MANIFEST, "status": "running"}, False, SHAS, "fp", True, "says running"),   # killed mid-run
    (RECORD, {**MANIFEST, "finished_at": "T2"}, False, SHAS, "fp", True, "rewritten since"),  # run again by hand
    ({**RECORD, "argv": ["03_sft_train.py", "--seed", "2"]}, MANIFEST, False, SHAS, "fp", True, "command line"),
    (RECORD, MANIFEST, False, {**SHAS, "data/train.jsonl": "bbb"}, "fp", True, "input data/train.jsonl changed"),
    (RECORD, MANIFEST, False, {"cfg.yaml": "ccc"}, "fp", True, "input data/train.jsonl changed"),  # input gone
    (RECORD, MANIFEST, False, SHAS, "fp2", True, "outputs were rewritten"),           # e.g. another run's 01
])
def test_decide(record, manifest, forced, shas, fingerprint, run, why):
    got_run, got_why = driver.decide(STAGE, record, manifest, forced, shas.get, lambda paths: fingerprint)
    assert got_run == run
    assert why in got_why


TRAINER = Stage("06_grpo", "06_train_grpo.py", ("--seed", "1"), "out/r1/06_grpo", "out/r1/06_grpo/manifest.json",
                "GRPO", inputs=("data/train.jsonl",))
CUT_SHORT = {"status": "running", "argv": ["06_train_grpo.py", "--seed", "1"], "inputs": {"data/train.jsonl": "aaa"}}


@pytest.mark.parametrize("stage, record, shas, expected", [
    (TRAINER, CUT_SHORT, SHAS, ("--resume", "auto")),                          # killed mid-run: continue
    (TRAINER, {**CUT_SHORT, "status": "interrupted"}, SHAS, ("--resume", "auto")),   # Ctrl-C
    (TRAINER, {**CUT_SHORT, "status": "failed"}, SHAS, ()),                      # a failure starts afresh
    (TRAINER, {**CUT_SHORT, "status": "complete"}, SHAS, ()),
    (TRAINER, None, SHAS, ()),                                                   # never run
    (TRAINER, {**CUT_SHORT, "argv": ["06_train_grpo.py", "--seed", "2"]}, SHAS, ()),   # another command
    (TRAINER, CUT_SHORT, {"data/train.jsonl": "bbb"}, ()),                       # another input
    (Stage("10_eval_sft", "10_evaluate.py", ("--seed", "1"), "f", "f/manifest.json", "eval"),
     {**CUT_SHORT, "argv": ["10_evaluate.py", "--seed", "1"]}, SHAS, ()),        # not a trainer
])
def test_resume_args(stage, record, shas, expected):
    assert driver.resume_args(stage, record, shas.get) == expected


def test_stage_record_then_decide_skips(tmp_path):
    """What stage_record stores is what decide compares: a completed stage is skipped until a file changes."""
    data, ckpt = tmp_path / "train.jsonl", tmp_path / "ckpt"
    data.write_text("a\n")
    ckpt.mkdir()
    (ckpt / "adapter.bin").write_bytes(b"w")
    stage = Stage("03_sft", "03_sft_train.py", ("--x",), str(tmp_path), str(tmp_path / "manifest.json"), "SFT",
                  inputs=(str(data),))
    manifest = {"status": "complete", "finished_at": "T1", "outputs": {"final": str(ckpt)},
                "inputs": {"train": {"path": str(data), "sha256": driver_sha(data)}}}
    record = driver.stage_record(stage, manifest, 12.34, driver_sha, driver.stat_fingerprint, "log")
    assert record["inputs"] == {str(data): driver_sha(data)} and record["duration_s"] == 12.3
    assert record["argv"] == ["03_sft_train.py", "--x"] and record["command"] == "python 03_sft_train.py --x"
    check = lambda: driver.decide(stage, record, manifest, False, driver_sha, driver.stat_fingerprint)[0]
    assert check() is False
    time.sleep(0.01)
    (ckpt / "adapter.bin").write_bytes(b"w")      # same bytes, rewritten: the outputs are not the recorded ones
    assert check() is True
    record = driver.stage_record(stage, manifest, 1, driver_sha, driver.stat_fingerprint, "log")
    data.write_text("b\n")                        # an input changed
    assert check() is True


def driver_sha(path):
    from utils.runs import sha256_path
    return sha256_path(path) if Path(path).exists() else None


def test_stat_fingerprint(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    first = driver.stat_fingerprint([tmp_path / "d"])
    assert driver.stat_fingerprint([str(tmp_path / "d")]) == first           # str or Path
    (tmp_path / "d" / "g").write_text("y")
    assert driver.stat_fingerprint([tmp_path / "d"]) != first                # a new file
    assert driver.stat_fingerprint([tmp_path / "missing"]) != driver.stat_fingerprint([])  # a missing output counts


# --- README ---
SUMMARY_CSV = ("run,policy,method,seed,n,exec_acc,exec_acc_ci_low,exec_acc_ci_high,prog_acc,format_rate,reward_mean,"
               "model\nr1,sft,sft,42,16,0.125,0.0,0.3125,0.0625,1.0,0.41,m\n")


def test_summary_table():
    assert driver.summary_table(SUMMARY_CSV).splitlines() == [
        "| policy | method | seed | n | exec_acc | exec_acc_ci_low | exec_acc_ci_high | prog_acc | format_rate | reward_mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| sft | sft | 42 | 16 | 0.125 | 0.000 | 0.312 | 0.062 | 1.000 | 0.410 |"]   # integers stay integers


def test_readme_text():
    stages = driver.plan(opts(methods=("grpo",), quick_test=True))
    info = {"run_id": "r1", "command": "python 12_driver.py --method grpo --quick_test", "methods": ["grpo"],
            "seeds": [42], "dataset": "finqa", "data_dir": "data", "context_mode": "retrieved", "quick_test": True,
            "config": CFG, "algo_config": None, "overrides": [], "model": "smollm2-135m", "model_path": "models/x",
            "git_commit": "abc"}
    text = driver.readme_text(info, stages, SUMMARY_CSV)
    for part in ("# Run r1", "Goal: compare GRPO", "| seeds | 42 |", "| context mode | retrieved |",
                 "| quick_test | yes", "python tests/benchmarks/bench_learnability.py", "python 03_sft_train.py --output_dir out/r1/03_sft", "| sft | sft | 42 |",
                 "[11_comparison/report.md](11_comparison/report.md)", "| git commit | abc |"):
        assert part in text, part
    assert "Not available yet" in driver.readme_text(info, stages, None)
