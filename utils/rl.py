"""What the four RL scripts share (05 PPO, 06 GRPO, 07 RLOO, 09 DPO): command line, start policy,
reference mechanism, prompts, reward functions, output folder, and the whole run of the TRL
online trainers (06, 07).

    parser = argument_parser(__doc__, "grpo", QUICK_TEST, "...")   # common flags + --policy_ckpt, --resume...
    cfg = config.from_args(args, extra_tokens, QUICK_TEST)         # model YAML < algorithm YAML < quick < CLI
    metrics = run("06_grpo", cfg, args, build_trainer)             # data, policy, callbacks, train, save

Pieces:
    start_checkpoint(args, cfg)            # --policy_ckpt in utils.modeling.resolve_checkpoint's forms
    load_policy(ckpt, cfg)                 # (peft model, start adapter trainable; tokenizer; info)
    add_reference_adapter(model)           # PPO: the frozen "ref" copy TRL's trainers add themselves
    load_prompts(path) / read_split(path)  # a processed split as a Dataset / as rows
    reward_functions(spec, sample_log)     # one TRL reward function per reward term, and the weights
    SampleLog                              # RLOO's per-sample reward and leave-one-out baseline log

One reference mechanism for every method: the start (SFT) adapter is trained, and the reference is
a frozen copy of it, the adapter "ref", over the same base weights (load_policy explains why).
run() does the same for GRPO and RLOO (same data, prompts, reward functions and weights, sampling
settings, validation protocol, checkpoint layout and log names); the script's build_trainer adds
its algorithm's own hyperparameters to trainer_arguments() and builds the TRL trainer.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

from utils import config as config_lib
from utils import generation, modeling, runs, training
from utils.data import read_processed
from utils.rewards import trl_reward_functions


# --- leave-one-out baseline ----------------------------------------------------------------

def leave_one_out_baselines(rewards: Sequence[float], group_size: int) -> list[float]:
    """Each reward's leave-one-out baseline: the mean of the other group_size - 1 rewards of its group.

    Args:
        rewards: rewards in consecutive groups (TRL's order: a prompt's completions are adjacent).
        group_size: completions per prompt (num_generations), at least 2.
    Returns:
        One baseline per reward.
    Example: leave_one_out_baselines([1.0, 0.0, 0.0, 1.0], 2) -> [0.0, 1.0, 1.0, 0.0]
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs groups of 2 or more, got group_size {group_size}")
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    baselines = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        total = sum(group)
        baselines += [(total - r) / (group_size - 1) for r in group]
    return baselines


# --- policy and reference ---

REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of the start adapter


def load_policy(ckpt: str | Path, cfg: dict):
    """The trainable policy every RL method (05 PPO, 06 GRPO, 07 RLOO, 09 DPO) starts from.

    Args:
        ckpt: a LoRA adapter folder (the SFT checkpoint), or a full model folder, which gets a
            fresh LoRA from cfg["lora"] (RL straight from a model; its reference is that model).
        cfg: the resolved config (model.dtype, lora).
    Returns:
        (peft model in train mode with the start adapter, named "default", trainable; tokenizer;
        {"dtype": the frozen base weights' dtype, "base_model": base folder or hub id}).

    The reference policy is a frozen copy of the start adapter, named "ref", over the same base
    weights: TRL's GRPO, RLOO and DPO trainers add it themselves when given a PeftModel (their
    "ref" adapter), PPO through add_reference_adapter(). The reference is then exactly the start
    policy, no second model is held, and the base weights keep the config's dtype (bf16 where it is
    fast; an 8B base stays 16 GB) while the LoRA weights stay float32 (peft upcasts adapters), so no
    update is rounded into half-precision weights. Every RL checkpoint is a LoRA adapter over
    the base model, loadable by utils.modeling.load_model like an SFT checkpoint.
    """
    from peft import PeftModel, get_peft_model

    if not cfg["lora"]["enabled"]:
        raise config_lib.ConfigError("lora.enabled false: the RL stages train a LoRA adapter against a frozen "
                                     "copy of the start adapter (the reference); full fine-tuning is for "
                                     "03_sft_train.py only. Drop --lora.enabled false")
    ckpt = Path(ckpt)
    base = modeling._adapter_base(ckpt)  # None for a full model folder
    dtype = modeling.resolve_dtype(cfg["model"].get("dtype") or "auto")
    model = modeling.load_model(base or str(ckpt), dtype=dtype)
    if base is not None:
        with modeling.reading_checkpoint(ckpt):
            model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
    else:
        model = get_peft_model(model, training.lora_config(cfg))
    model.train()
    tokenizer = modeling.load_tokenizer(ckpt, chat_template=None)
    tokenizer.padding_side = "left"
    return model, tokenizer, {"dtype": str(dtype).replace("torch.", ""), "base_model": base or str(ckpt)}


def add_reference_adapter(model) -> None:
    """Add the frozen reference adapter: a copy of the start ("default") adapter named "ref", as TRL's
    trainers do for GRPO, RLOO and DPO. Take reference passes inside trl's use_adapter(model, "ref")."""
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            reference = model.get_parameter(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
            reference.data.copy_(param.data)
            reference.requires_grad_(False)
    model.set_adapter("default")  # keeps "default" active and trainable, "ref" frozen


# --- data and rewards ------------------------------------------------------------------------

# What the reward API reads from a processed example (plus the prompt that TRL samples from).
REWARD_COLUMNS = ("id", "table", "exe_ans", "target_program", "target_answer")


def require_split(path: str | Path, flag: str) -> Path:
    """The path of a processed split; a missing file names the flag and how to make it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python 01_prepare_dataset.py first (or pass {flag} FILE, "
                                f"or --paths.data_dir FOLDER with train.jsonl and val.jsonl)")
    return path


def load_prompts(path: str | Path, limit: int | None = None):
    """A processed split as a datasets.Dataset of prompt + REWARD_COLUMNS (the first `limit` rows).

    Every line is checked first (read_split): a broken file then fails with a line that names the
    line and field, not with the datasets library's traceback. datasets.load_dataset("json") reads
    the mixed exe_ans column (numbers, "yes"/"no") as a Json feature; Dataset.from_list cannot.
    """
    import datasets

    read_split(path, "--train_jsonl")
    data = datasets.load_dataset("json", data_files=str(path), split="train")
    data = data.select_columns(["prompt", *REWARD_COLUMNS])
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def read_split(path: Path, flag: str) -> list[dict]:
    """A processed split's examples, each with a prompt and REWARD_COLUMNS (require_split's error when it is
    missing, utils.data.read_processed's when a line is broken)."""
    return read_processed(require_split(path, flag), ("prompt", *REWARD_COLUMNS))


def reward_functions(spec, sample_log: "SampleLog | None" = None):
    """utils.rewards.trl_reward_functions(spec), given only the dataset's columns.

    TRL 1.16 also passes prompts, completion_ids, trainer_state, log_extra and log_metric (its
    public reward-function hooks); the reward API builds each example from the per-row columns,
    so only those reach it. With `sample_log`, every value is also handed to it, with the
    trainer state, to write the per-sample log. Returns (functions, weights) for reward_funcs /
    reward_weights.
    """
    functions, weights = trl_reward_functions(spec)

    def columns_only(function, weight):
        def reward(completions, trainer_state=None, **columns):
            values = function(completions, **{k: columns[k] for k in REWARD_COLUMNS if k in columns})
            if sample_log is not None and trainer_state is not None:
                sample_log.add(trainer_state, function.__name__, weight, columns.get("id", []), values)
            return values
        reward.__name__ = function.__name__  # TRL logs rewards/<__name__>/mean
        return reward

    if sample_log is not None:
        sample_log.expect(len(functions))
    return [columns_only(f, w) for f, w in zip(functions, weights)], weights


class SampleLog:
    """RLOO's per-sample log, fed by the reward functions (reward_functions(spec, sample_log)):
    one JSON line per sampled completion and step in `path`, {"step", "group", "id", "reward" (the
    weighted total), "rewards" (each function's unweighted value), "baseline" (the mean of the
    other k - 1 totals of its group: RLOO's leave-one-out baseline), "loo_advantage" (reward -
    baseline: RLOOTrainer's advantage when beta is 0 and normalize_advantages is off)}.

    TRL calls the reward functions one after the other on each generation batch of this process,
    in which a prompt's k completions are adjacent; once the last function reported, the batch is
    written. A resumed run first drops the lines of the steps it redoes.
    """

    def __init__(self, path, group_size: int):
        self.path, self.group_size = Path(path), group_size
        self.n_functions, self.pending = 0, {}
        self._started = False

    def expect(self, n_functions: int) -> None:
        self.n_functions = n_functions

    def add(self, state, name: str, weight: float, ids, values) -> None:
        if not state.is_world_process_zero:
            return
        self.pending[name] = (weight, list(values))
        if len(self.pending) == self.n_functions:
            self._write(state.global_step + 1, [str(i) for i in ids])  # the step these samples train
            self.pending = {}

    def _write(self, step: int, ids: list[str]) -> None:
        n = len(ids)
        totals = [sum(weight * values[i] for weight, values in self.pending.values()) for i in range(n)]
        baselines = leave_one_out_baselines(totals, self.group_size) if n % self.group_size == 0 else [None] * n
        rows = [{"step": step, "group": i // self.group_size, "id": ids[i], "reward": totals[i],
                 "baseline": baselines[i], "loo_advantage": None if baselines[i] is None else totals[i] - baselines[i],
                 "rewards": {name: values[i] for name, (_, values) in self.pending.items()}} for i in range(n)]
        if not self._started and self.path.is_file():  # resumed: drop the steps the interrupted run did after
            runs.atomic_write_jsonl(self.path, [r for r in runs.read_jsonl(self.path) if r["step"] < step])
        self._started = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


# --- one forward pass per prompt, not per completion -------------------------------------------

def shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool = False):
    """Per-token log-probs (and entropies) of the last `logits_to_keep` tokens of each row, computing
    each distinct prompt once: the same numbers as TRL's one forward over prompt + completion.

    A group's num_generations completions share their prompt, and on the ladder the prompt is ~90 %
    of a row's tokens, so one pass per group instead of one per row cuts a step's forward and
    backward several-fold (bench_train_step.py --rl_groups). The distinct prompts, all but their
    last token, run once (utils.generation.shared_prefix_cache); then each row's last prompt token
    and completion run over that cache. Positions, masks and attention are the full forward's (RoPE sees the same positions
    0..L-1), so only float rounding differs. Needs TRL's fused head on the model (`fused_lm_head=True`:
    log-probs at the temperature without the vocabulary-sized logits).

    Returns (log_probs, entropies or None), each (rows, logits_to_keep), as TRL's
    _get_per_token_logps_and_entropies; None when no two rows share a prompt.
    """
    prefix_len = input_ids.size(1) - logits_to_keep - 1
    cache = generation.shared_prefix_cache(model, input_ids, attention_mask, prefix_len)
    if cache is None:
        return None
    suffix = input_ids[:, prefix_len:]
    labels = suffix.masked_fill(attention_mask[:, prefix_len:] == 0, -100)
    outputs = model(input_ids=suffix, attention_mask=attention_mask, cache=cache, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -logits_to_keep:], outputs.entropy[:, -logits_to_keep:] if compute_entropy else None


@contextlib.contextmanager
def shared_prompt_generation(model):
    """Inside it, model.generate prefills each distinct prompt once: TRL repeats every prompt
    num_generations times in the batch it samples, and the prefill of those copies was most of a
    step's sampling time. The prompts but their last token run once into a cache (at the positions
    generate gives them: pads not counted), which generate then continues row by row; the samples
    are those of the plain call up to float rounding."""
    import torch

    generate, own = model.generate, vars(model).get("generate")

    def generate_from_shared_prefill(input_ids=None, attention_mask=None, **kwargs):
        if input_ids is not None and attention_mask is not None and not {"cache", "past_key_values"} & set(kwargs):
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            with torch.no_grad():
                cache = generation.shared_prefix_cache(model, input_ids, attention_mask, input_ids.size(1) - 1,
                                                       positions)
            if cache is not None:
                kwargs["cache"] = cache
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.generate = generate_from_shared_prefill
    try:
        yield
    finally:
        if own is None:
            del model.generate  # the class's method again
        else:
            model.generate = own


class SharedPromptForward:
    """Mixin for TRL's GRPOTrainer and RLOOTrainer (class GRPO(SharedPromptForward, GRPOTrainer)):
    their log-probs of the policy, the reference and the old policy through shared_prompt_logps, one
    pass per distinct prompt in each chunk. TRL's own pass where it does not apply: images and other
    model inputs, gradient checkpointing (which turns the cache off), rows that share no prompt.
    TRL returns the MoE aux loss only on request; that request also takes TRL's pass. Sampling with
    transformers prefills each distinct prompt once too (shared_prompt_generation)."""

    def _generate_single_turn(self, *args, **kwargs):
        with shared_prompt_generation(self.model):
            return super()._generate_single_turn(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **model_inputs):
        import torch

        unsupported = compute_aux_loss or any(v is not None for v in model_inputs.values()) or (
            model.training and self.args.gradient_checkpointing)
        if unsupported:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_inputs)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                chunk = shared_prompt_logps(model, ids, mask, logits_to_keep, compute_entropy)
            if chunk is None:  # no two rows of this chunk share a prompt: one pass over the rows
                chunk = super()._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep,
                                                                   compute_entropy=compute_entropy)[:2]
            logps.append(chunk[0])
            entropies.append(chunk[1])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


# --- where a step's time goes ----------------------------------------------------------------

class StepTimes(training.TrainerCallback):
    """Adds to each GRPO/RLOO training log entry where its optimizer steps' time went, in seconds per
    step (averaged over the steps since the previous entry), with PPO's names (05 logs the same):

        time/generate_s    sampling the completions (TRL's transformers.generate)
        time/rewards_s     the reward functions
        time/reference_s   the rest of TRL's input preparation: the reference policy's log-probs
                           (none when beta is 0; the old policy's too when num_iterations > 1),
                           tokenizing and batching
        time/update_s      the policy's forward and backward passes over the micro-batches, and the
                           optimizer step
        time/step_s        the whole optimizer step

    TRL times these stages itself (trl.extras.profiling.ProfilingContext) but hands the durations
    only to wandb, MLflow or Trackio; one wrapper around ProfilingContext._log_metrics, installed
    once per process, collects them here as well. List it first (the validation that other callbacks
    run at a step's end is not step time), before the log callback.
    """

    _totals: dict = {}
    _installed = False

    def __init__(self, reward_names: Sequence[str]):
        self.reward_names = set(reward_names)
        self._steps, self._step_s, self._started = 0, 0.0, None
        self._install()

    @classmethod
    def _install(cls) -> None:
        from trl.extras.profiling import ProfilingContext

        if cls._installed:
            return
        log_metrics = ProfilingContext._log_metrics

        def record(context, duration):
            name = context.name.split(".", 1)[-1]  # "GRPOTrainer.compute_loss" -> "compute_loss"
            cls._totals[name] = cls._totals.get(name, 0.0) + duration
            log_metrics(context, duration)

        ProfilingContext._log_metrics = record
        cls._installed = True

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = training.synced_clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self._step_s += training.synced_clock() - self._started
            self._steps += 1
            self._started = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}) or not self._steps or not state.log_history:
            return
        totals, n = self._totals, self._steps
        generate = totals.get("transformers.generate", 0.0)
        rewards = sum(v for k, v in totals.items() if k in self.reward_names)
        prepare = totals.get("_prepare_inputs", 0.0)  # includes generate and rewards
        state.log_history[-1].update({
            "time/generate_s": round(generate / n, 3), "time/rewards_s": round(rewards / n, 3),
            "time/reference_s": round(max(prepare - generate - rewards, 0.0) / n, 3),
            "time/update_s": round(max(self._step_s - prepare, 0.0) / n, 3), "time/step_s": round(self._step_s / n, 3)})
        totals.clear()
        self._steps, self._step_s = 0, 0.0


# --- command line ------------------------------------------------------------------------------

def argument_parser(description: str, method: str, quick_test: dict, quick_help: str):
    """The command line every RL script shares (05, 06, 07, 09): the common flags with the
    method's algorithm config, the start policy, the data, the reward spec, --quick_test, --resume.
    `quick_test` is the script's {section.key: value} smoke settings (explicit flags win)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser, algo=method)
    parser.add_argument("--policy_ckpt", default=None,
                        help="the start policy: a run folder (its SFT policy, 03_sft/ckpt_sft/best), a module "
                             "folder (03_sft: its ckpt_sft/best), a ckpt_* folder (its best/), a checkpoint "
                             "folder, or a base model (config name or hub id) (default: outputs/<run_id>)")
    parser.add_argument("--train_jsonl", default=None, help="prompts (default: <paths.data_dir>/train.jsonl)")
    parser.add_argument("--val_jsonl", default=None, help="validation (default: <paths.data_dir>/val.jsonl)")
    parser.add_argument("--reward_spec", default=None,
                        help="reward_spec.yaml (default: outputs/<run_id>/02_rewards/reward_spec.yaml if "
                             "present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {quick_help} (" + ", ".join(f"{k} {v}" for k, v in quick_test.items())
                             + "; explicit flags win)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run: from the newest complete checkpoint in the output "
                             "folder, or the one given (optimizer, scheduler, RNG, training log and best so far); "
                             "'--resume auto': the newest if there is one, else start afresh")
    return parser


def start_checkpoint(args, cfg: dict) -> str:
    """The start policy: --policy_ckpt in any of utils.modeling.resolve_checkpoint's forms, else the
    run's SFT policy (outputs/<run_id>/03_sft/ckpt_sft/best)."""
    return modeling.resolve_checkpoint(args.policy_ckpt or Path(cfg["paths"]["output_root"]) / args.run_id)


def prepare_run_folder(folder: Path, method: str, resume: str | None, last_checkpoint=None) -> str | None:
    """training.prepare_folder for an RL run: a fresh run clears the method's checkpoints, logs and
    validation generations. Returns the checkpoint --resume continues from, or None."""
    return training.prepare_folder(folder, (f"ckpt_{method}", "logs", "val_generations"), resume, last_checkpoint)


def output_folder(args, cfg: dict, module: str) -> Path:
    """--output_dir (= --paths.output_dir), else outputs/<run_id>/<module>: one rule in every script."""
    return runs.module_dir(args.run_id, module, cfg["paths"]["output_dir"], cfg["paths"]["output_root"])


def trainer_arguments(cfg: dict, folder: Path, reward_weights: list[float]) -> dict:
    """GRPOConfig / RLOOConfig keywords that GRPO and RLOO share: cfg["training"] (utils.training),
    sampling, the KL coefficient, group size, reward weights and TRL's vLLM options."""
    algo = cfg["algorithm"]
    return dict(
        **training.training_arguments(cfg, folder / "trainer"),
        num_generations=algo["num_generations"],
        beta=algo["beta"],
        temperature=algo["temperature"],
        top_p=algo["top_p"],
        max_completion_length=cfg["generation"]["max_new_tokens"],
        reward_weights=reward_weights,
        # the log-probs of sampling and of the update must come from the same function (05 PPO
        # runs without dropout too)
        disable_dropout=True,
        use_vllm=algo["use_vllm"],
        vllm_mode=algo["vllm_mode"],
        vllm_gpu_memory_utilization=algo["vllm_gpu_memory_utilization"],
    )


def trainer_callbacks(cfg: dict, folder: Path, method: str, tokenizer, val_rows: list[dict], spec,
                      resumed: bool, extra=()):
    """The callbacks of every TRL-based RL trainer (06, 07, 09), in the order they must run: the NaN
    guard, greedy validation on its own schedule, checkpoints (best by its results), `extra` (DPO's
    SequenceKL), and the log last (utils.training explains the order).
    Returns (callbacks, validation, checkpoints, log)."""
    ckpt_dir = folder / f"ckpt_{method}"
    validation = training.ValidationCallback(
        val_rows, tokenizer, folder / "val_generations", spec=spec, every=cfg["validation"]["eval_steps"],
        max_new_tokens=cfg["validation"]["max_new_tokens"], batch_size=cfg["validation"]["batch_size"],
        samples_format="jsonl")
    checkpoints = training.CheckpointCallback(ckpt_dir, tokenizer, cfg, validation=validation, resume=resumed,
                                              save_total_limit=cfg["training"]["save_total_limit"])
    log = training.JsonLogCallback(folder / "logs" / "training_log.json", cfg["training"]["report_to"])
    callbacks = [training.NonFiniteGuard(ckpt_dir, folder / "trainer"), validation, checkpoints, *extra, log]
    return callbacks, validation, checkpoints, log


def parse_args(description: str, method: str, argv=None):
    """The command line of the TRL online trainers (06 GRPO, 07 RLOO), with their --quick_test."""
    quick = f"{QUICK_TEST_TRAIN_PROMPTS} train prompts, 2 steps of 2 prompts x 2 generations"
    return argument_parser(description, method, QUICK_TEST, quick).parse_known_args(argv)


# --- the run ---------------------------------------------------------------------------------

# --quick_test of 06 and 07: 48 new tokens hold the sample's p95 answer (54 tokens), shorter budgets
# cut every JSON answer and leave a constant reward
QUICK_TEST = {"training.max_steps": 2, "training.save_steps": 1, "training.logging_steps": 1,
              "algorithm.num_generations": 2, "training.per_device_train_batch_size": 4,
              "training.gradient_accumulation_steps": 1,
              "generation.max_new_tokens": 48, "validation.max_new_tokens": 48, "validation.num_samples": 4,
              "validation.eval_steps": 2}
QUICK_TEST_TRAIN_PROMPTS = 8


def check_vllm(cfg: dict) -> None:
    """Refuse vLLM sampling from a half-precision merge of the policy unless the config opts in: TRL's weight
    sync merges the LoRA into the base weights, and bf16(W + dW) loses every update below half a bf16 step."""
    import torch

    algo = cfg["algorithm"]
    if not algo["use_vllm"] or algo["vllm_allow_half_precision_merge"]:
        return
    dtype = modeling.resolve_dtype(cfg["model"]["dtype"] or "auto")
    if dtype in (torch.bfloat16, torch.float16):
        raise config_lib.ConfigError(
            f"--algorithm.use_vllm true over a {str(dtype).replace('torch.', '')} base (model.dtype): vLLM would "
            f"sample from the LoRA merged into rounded half-precision weights, which erases small updates; use "
            f"--model.dtype float32, or accept the rounding with --algorithm.vllm_allow_half_precision_merge true")


def run(module: str, cfg: dict, args, build_trainer, sample_log: SampleLog | None = None) -> dict:
    """One GRPO/RLOO run: data, policy, callbacks, training, checkpoints, manifest.

    build_trainer(cfg, trainer_args, inputs, folder) returns the algorithm's TRL trainer, built
    from the shared trainer_arguments() plus its own hyperparameters and the trainer inputs
    (model, reward_funcs, train_dataset, processing_class, callbacks). Returns the manifest metrics.
    """
    method = cfg["algorithm"]["name"]
    check_vllm(cfg)
    state = training.process_state()  # first: every process then loads its model onto its own device
    say = print if state.is_main_process else (lambda *_, **__: None)  # one process reports, one writes
    say(config_lib.dump(cfg))
    folder = output_folder(args, cfg, module)
    ckpt_dir, log_path = folder / f"ckpt_{method}", folder / "logs" / "training_log.json"
    resume_from = prepare_run_folder(folder, method, args.resume)
    runs.seed_everything(cfg["training"]["seed"])
    data_dir = Path(cfg["paths"]["data_dir"])
    train_path = Path(args.train_jsonl or data_dir / "train.jsonl")
    val_path = Path(args.val_jsonl or data_dir / "val.jsonl")

    with runs.Manifest(folder, module, args, cfg, main_process=state.is_main_process) as manifest:
        # --- data ---
        train = load_prompts(train_path, QUICK_TEST_TRAIN_PROMPTS if args.quick_test else None)
        val_rows = read_split(val_path, "--val_jsonl")[:cfg["validation"]["num_samples"]]
        spec, spec_path = training.resolve_reward_spec(args.reward_spec, cfg, args.run_id)
        for name, path in (("train", train_path), ("val", val_path), ("reward_spec", spec_path)):
            if path is not None:
                manifest.add_input(name, path)
        say(f"{len(train)} training prompts ({train_path}), {len(val_rows)} validation examples ({val_path}); "
              f"reward spec: {spec_path or 'built-in defaults'}")

        # --- policy ---
        ckpt = start_checkpoint(args, cfg)
        if Path(ckpt).is_dir():
            manifest.add_input("policy_ckpt", ckpt)
        model, tokenizer, policy = load_policy(ckpt, cfg)
        precision = training.mixed_precision(cfg)
        say(f"policy: {ckpt} on {policy['base_model']} ({policy['dtype']} base, fp32 LoRA; {precision['note']})")

        # --- train ---
        functions, weights = reward_functions(spec, sample_log)
        callbacks, validation, checkpoints, log = trainer_callbacks(cfg, folder, method, tokenizer, val_rows, spec,
                                                                    resumed=resume_from is not None)
        callbacks.insert(0, StepTimes([f.__name__ for f in functions]))  # first: validation is not step time
        inputs = dict(model=model, reward_funcs=functions, train_dataset=train, processing_class=tokenizer,
                      callbacks=callbacks)
        trainer = build_trainer(cfg, trainer_arguments(cfg, folder, weights), inputs, folder)
        output = trainer.train(resume_from_checkpoint=resume_from)

        # --- save ---
        if not state.is_main_process:  # the main process holds the validation, best and log
            return {}
        final = checkpoints.save_final(trainer.model, trainer.state.global_step)
        log.write(trainer.state)
        for name, path in (("final", final), ("best", ckpt_dir / "best"), ("training_log", log_path),
                           ("val_generations", folder / "val_generations"), ("trainer", folder / "trainer")):
            manifest.add_output(name, path)
        manifest.metrics.update(final_metrics(trainer.state.log_history, checkpoints.best, log))
        manifest.metrics.update({
            "train_runtime_s": output.metrics.get("train_runtime"),
            "dtype": policy["dtype"], "mixed_precision": "bf16" if precision["bf16"] else "no",
            "base_model": policy["base_model"], "policy_ckpt": str(ckpt),
            "reward_spec": str(spec_path) if spec_path else "built-in defaults",
            "n_train_prompts": len(train), "n_val_examples": len(val_rows), "num_processes": state.num_processes,
        })
        print(f"done: final {final}; best step {manifest.metrics['best_step']}; "
              f"{manifest.metrics['train_tokens_per_s'] or 0:.1f} tokens/s, "
              f"{manifest.metrics['step_time_s_mean'] or 0:.1f} s/step")
        return manifest.metrics


def final_metrics(history: list[dict], best: dict | None, log) -> dict:
    """Manifest metrics from the log history: the last training log (TRL's names), means over the
    run, the first and last validation, and the best checkpoint's validation."""
    steps = [entry for entry in history if "reward" in entry]
    vals = [entry for entry in history if "val/exec_acc" in entry]
    last = steps[-1] if steps else {}
    mean = lambda key: (sum(e[key] for e in steps if e.get(key) is not None)  # noqa: E731
                        / max(1, sum(e.get(key) is not None for e in steps))) if steps else None
    best = best or {}
    return {
        "global_step": last.get("step"),
        **{f"final_{key.replace('/', '_')}": last.get(key) for key in
           ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "loss", "grad_norm")},
        "reward_mean_over_training": mean("reward"),
        "step_time_s_mean": mean("step_time"),
        "train_tokens": log.tokens,
        "train_tokens_per_s": log.tokens_per_s,
        "peak_rss_gb": log.peak_rss_gb,
        "peak_gpu_gb": log.peak_gpu_gb,
        "best_step": best.get("step"),
        **{f"best_val_{key}": best.get("metrics", {}).get(key) for key in ("exec_acc", "format_rate", "reward_mean")},
        **{f"{when}_val_{key}": (entry or {}).get(f"val/{key}") for when, entry in
           (("first", vals[0] if vals else None), ("last", vals[-1] if vals else None))
           for key in ("exec_acc", "format_rate", "reward_mean")},
    }
