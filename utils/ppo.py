"""PPO for a LoRA language-model policy, written out in one module (CleanRL style).

    trainer = PPOTrainer(cfg, model, tokenizer, spec, accelerator)
    for step in range(1, hp.max_steps + 1):
        metrics = trainer.step(prompt_batch(train, step), step)   # one rollout and its updates

One step, after Ziegler et al. (2019) "Fine-Tuning Language Models from Human Preferences"
and the InstructGPT recipe (Ouyang et al. 2022), in TRL's names:
  1. rollout   sample one completion per prompt from the policy (temperature, top_p).
  2. score     R = utils.rewards.score(completion).total; normalized by running mean/std and
               clipped to +-reward_clip.
  3. forward   log-probs of the sampled tokens under the policy (old) and the reference (the
               SFT policy: the same base under a frozen copy of the SFT adapter), and values V_t.
  4. reward    r_t = -kl_coef (log pi(a_t) - log pi_ref(a_t)), plus R on the last token.
  5. GAE       delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
  6. update    ppo_epochs passes over num_mini_batches mini-batches of
               loss = L_clip + vf_coef L_V - entropy_coef H, stopping early once approx-KL > max_approx_kl.
  7. KL ctl    kl_coef *= 1 + clip(KL / target_kl - 1, -0.2, 0.2) * n / horizon  (adaptive_kl).

Tensors of a rollout are [batch, response_length]: responses are right-padded after their EOS and
`mask` is 1 on response tokens (EOS included), so every response is a prefix of its row.
The math (section "math") is pure functions, unit-tested against hand-computed values.
Randomness is derived from (seed, step, process), so a resumed run samples what the
uninterrupted run would have.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from trl.trainer.utils import use_adapter

from utils import training
from utils.generation import generate
from utils.rewards import RewardSpec, reward_log, score
from utils.rl import REFERENCE_ADAPTER


# --- hyperparameters ---
@dataclass(frozen=True)
class PPOHyperparams:
    """Every number PPO uses, in one place (configs/algorithms/ppo.yaml explains each value)."""
    rollout_batch_size: int      # prompts per step, over all processes
    ppo_epochs: int              # passes over each rollout
    num_mini_batches: int        # gradient steps per pass
    clip_range: float            # epsilon of the clipped surrogate
    clip_range_value: float      # how far values may move from the rollout's values
    kl_coef: float               # initial beta of the per-token KL penalty
    adaptive_kl: bool
    target_kl: float             # nats per completion the adaptive controller aims for
    kl_horizon: int              # controller horizon, in samples
    gamma: float
    lam: float
    vf_coef: float
    entropy_coef: float
    whiten_rewards: bool
    normalize_rewards: bool
    reward_clip: float
    max_approx_kl: float         # early-stop bound of an update
    temperature: float           # rollout sampling; log-probs use the same temperature
    top_p: float
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    max_steps: int
    warmup_ratio: float
    lr_scheduler_type: str
    micro_batch_size: int        # sequences per forward/backward (training.per_device_train_batch_size)
    max_new_tokens: int          # rollout completion budget (generation.max_new_tokens)
    generation_batch_size: int   # prompts per generate call (generation.batch_size)
    seed: int

    @classmethod
    def from_config(cls, cfg: dict) -> "PPOHyperparams":
        algo, train, gen = cfg["algorithm"], cfg["training"], cfg["generation"]
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in algo.items() if k in names}
        values.update(learning_rate=train["learning_rate"], weight_decay=train["weight_decay"],
                      max_grad_norm=train["max_grad_norm"], max_steps=train["max_steps"],
                      warmup_ratio=train["warmup_ratio"], lr_scheduler_type=train["lr_scheduler_type"],
                      micro_batch_size=train["per_device_train_batch_size"], seed=train["seed"],
                      max_new_tokens=gen["max_new_tokens"], generation_batch_size=gen["batch_size"])
        return cls(**values)


# --- math ---
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of x over positions where mask is 1."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; shift_mean=False keeps the mean (TRL's reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materializing the whole log-softmax."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position: H = logsumexp(z) - sum softmax(z) z."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def kl_penalty_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty (Ziegler et al. 2019, eq. 2).

    r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)), and the sequence score is added on
    the last response token: the reward model judges the whole completion once.
    Args: scores [B]; logprobs, ref_logprobs, mask [B, T].
    Returns: (rewards [B, T], kl [B, T]) where kl is the per-token k1 estimate (0 on padding).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # responses are prefixes: the last 1 of each row
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards over response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t           (TD error; V after the last token is 0)
    A_t     = delta_t + gamma lam A_{t+1}
    returns = A + V                               (the value head's regression target)
    Padding is zeroed first, so the state after a response's last token is worth 0 and no
    advantage flows back from padding. Returns (advantages, returns), both 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimize.

    ratio  = exp(log pi - log pi_old)
    L_clip = -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)] = E[max(-ratio A, -clip(ratio) A)]
    Returns (loss, clipfrac: share of tokens where the clipped term is the active one,
    approx_kl: the k3 estimator E[(ratio - 1) - log ratio] of KL(pi_old || pi)).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the PPO2 baselines' value clipping).

    V_clip = V_old + clip(V - V_old, -c, c)
    L_V    = 0.5 E[max((V - R)^2, (V_clip - R)^2)]
    Returns (loss, clipfrac: share of tokens where the clipped term is the larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 = perfect value head, 0 = no better than a constant."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


class FixedKLController:
    """kl_coef stays as configured (adaptive_kl: false)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019), section 2.2: a proportional controller on the KL coefficient.

    e        = clip(KL / target - 1, -0.2, 0.2)
    kl_coef *= 1 + e * n_steps / horizon          (n_steps: samples in this rollout)
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and (population) variance of every reward seen, merged batch by batch (Chan et al.)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n, batch_mean, batch_var = xs.numel(), float(xs.mean()), float(xs.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalize(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.mean) / (self.std + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# --- model ---
class PolicyWithValueHead(nn.Module):
    """The LoRA policy and a linear value head on its last-layer hidden states (one backbone).

    One module, so accelerate wraps policy and value head together (DDP syncs both), and the
    value loss also shapes the shared LoRA features, as in Ziegler et al.'s shared-trunk setup.
    """

    def __init__(self, policy: nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy  # a peft model: base weights frozen, LoRA trainable
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no made-up baseline
        nn.init.zeros_(self.value_head.bias)

    @staticmethod
    def _inputs(input_ids, attention_mask, response_length, **extra) -> dict:
        # left padding: positions count real tokens only, as generate() numbers them
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # logits only where they predict response tokens: [B, R, vocab] instead of [B, P + R, vocab]
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response_length + 1, use_cache=False, **extra)

    def forward(self, input_ids, attention_mask, response_length: int):
        """(logits [B, R, vocab] float32, values [B, R]) at the positions that emit the response."""
        out = self.policy(**self._inputs(input_ids, attention_mask, response_length, output_hidden_states=True))
        hidden = out.hidden_states[-1][:, -response_length - 1:-1]  # the state before each response token
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits[:, :-1].float(), values

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, response_length: int) -> torch.Tensor:
        """Logits of the reference policy: the same base weights under the frozen "ref" adapter, a
        copy of the start (SFT) adapter (utils.rl.add_reference_adapter), as TRL's trainers do."""
        with use_adapter(self.policy, REFERENCE_ADAPTER):
            out = self.policy(**self._inputs(input_ids, attention_mask, response_length))
        return out.logits[:, :-1].float()


def build_policy(policy, cfg: dict, resume_dir: str | Path | None = None) -> PolicyWithValueHead:
    """Wrap the start policy (utils.rl.load_policy: the SFT adapter trainable, "default") with a value
    head, and add the frozen reference adapter "ref", a copy of the start adapter: at step 0
    policy and reference are the same, KL = 0, and no second model is held. resume_dir (a
    ckpt_ppo/step_N folder) restores the trained adapter and value head.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from utils.rl import add_reference_adapter

    add_reference_adapter(policy)
    if cfg["training"]["gradient_checkpointing"]:
        # non-reentrant: gradients reach the LoRA weights although the inputs need no grad
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if resume_dir is not None:
        set_peft_model_state_dict(policy, load_file(str(Path(resume_dir) / "adapter_model.safetensors")),
                                  adapter_name="default")
    model = PolicyWithValueHead(policy, policy.config.hidden_size).to(policy.device)
    if resume_dir is not None:
        model.value_head.load_state_dict(torch.load(Path(resume_dir) / "value_head.pt", weights_only=True))
    disable_dropout(model)
    model.train()  # for gradient checkpointing, which runs in train mode only; dropout is off
    return model


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for the whole run (as TRL's disable_dropout_in_model): the rollout's log-probs
    and the update's must come from the same function, or the ratio is not 1 at the first update."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # functional dropout (llama, qwen2)
            module.attention_dropout = 0.0


# --- rollout ---
@dataclass
class Rollout:
    """One sampled completion per prompt, as token ids: [prompt, left-padded | response, right-padded]."""
    query_response: torch.Tensor   # [B, P + R]
    attention_mask: torch.Tensor   # [B, P + R]
    mask: torch.Tensor             # [B, R] 1 on response tokens up to and including EOS
    texts: list[str]               # decoded responses (special tokens removed), for scoring
    truncated: list[bool]          # no EOS within max_new_tokens

    @property
    def response_length(self) -> int:
        return self.mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        return self.query_response[:, -self.response_length:]


def sample_rollout(policy, tokenizer, prompts: list[list[dict]], hp: PPOHyperparams, seed: int,
                   device) -> Rollout:
    """Sample one completion per chat prompt with utils.generation.generate (batched, seeded, context
    checked) and keep the token ids (the text alone is not enough: re-tokenizing decoded text need
    not give back the sampled tokens)."""
    outputs = generate(policy, tokenizer, prompts, max_new_tokens=hp.max_new_tokens,
                       batch_size=hp.generation_batch_size, do_sample=True, temperature=hp.temperature,
                       top_p=hp.top_p, seed=seed, desc="rollout", show_progress=False, token_ids=True)
    queries = [o["prompt_ids"] for o in outputs]
    responses = [o["completion_ids"][0] for o in outputs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # one tensor for the batch: prompts left-padded to the longest, responses right-padded
    prompt_width, length = max(map(len, queries)), max(map(len, responses))
    ids, attention, mask = [], [], []
    for query, response in zip(queries, responses):
        gap, tail = prompt_width - len(query), length - len(response)
        ids.append([pad_id] * gap + query + response + [pad_id] * tail)
        attention.append([0] * gap + [1] * (len(query) + len(response)) + [0] * tail)
        mask.append([1] * len(response) + [0] * tail)
    as_tensor = lambda rows, dtype: torch.tensor(rows, dtype=dtype, device=device)  # noqa: E731
    return Rollout(query_response=as_tensor(ids, torch.long), attention_mask=as_tensor(attention, torch.long),
                   mask=as_tensor(mask, torch.float32), texts=[o["completions"][0] for o in outputs],
                   truncated=[not o["finished"][0] for o in outputs])


# --- trainer ---
class PPOTrainer:
    """State of a PPO run (model, optimizer, schedule, KL controller, reward statistics) and its step.

    Args:
        cfg: the resolved config (needs the `algorithm` section of configs/algorithms/ppo.yaml).
        model: a PolicyWithValueHead (from build_policy), not yet prepared.
        tokenizer: the policy's tokenizer.
        spec: the reward spec.
        accelerator: an accelerate.Accelerator; model and optimizer are prepared here.
    """

    def __init__(self, cfg: dict, model: PolicyWithValueHead, tokenizer, spec: RewardSpec, accelerator):
        from transformers import get_scheduler

        self.cfg, self.hp = cfg, (hp := PPOHyperparams.from_config(cfg))
        self.tokenizer, self.spec, self.accelerator = tokenizer, spec, accelerator
        world = accelerator.num_processes
        if hp.rollout_batch_size % world:
            raise ValueError(f"algorithm.rollout_batch_size {hp.rollout_batch_size} must be divisible by the "
                             f"number of processes ({world}): set --algorithm.rollout_batch_size")
        self.local_batch_size = hp.rollout_batch_size // world
        if self.local_batch_size % hp.num_mini_batches:
            raise ValueError(f"algorithm.rollout_batch_size per process ({self.local_batch_size}) must be "
                             f"divisible by algorithm.num_mini_batches ({hp.num_mini_batches})")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.params = params
        # the schedule advances once per PPO step: early stopping makes the update count vary
        self.scheduler = get_scheduler(hp.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(hp.warmup_ratio * hp.max_steps),
                                       num_training_steps=max(hp.max_steps, 1))
        self.kl_controller = (AdaptiveKLController(hp.kl_coef, hp.target_kl, hp.kl_horizon) if hp.adaptive_kl
                              else FixedKLController(hp.kl_coef))
        self.reward_moments = RunningMoments()

    @property
    def unwrapped(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    # --- one step ---
    def step(self, examples: list[dict], step: int) -> dict:
        """Rollout on this process's examples, then the PPO update; returns metrics over all processes.

        TRL's names and meanings (utils.rewards.reward_log): reward, reward_std (the weighted
        total score), rewards/<function>/mean and /std (each reward function's unweighted value),
        kl (per-token mean of log pi - log pi_ref over the response tokens, as RLOOTrainer logs
        it), entropy (mean per-token, in the updates), completions/mean_length, completions/clipped_ratio (no EOS),
        loss, grad_norm (before clipping), learning_rate, train/tokens_per_s (generated tokens per
        second of the whole step). Ours, under ppo/: policy_loss, value_loss, clipfrac,
        value_clipfrac, approx_kl (k3, means over the updates taken), explained_variance (rollout
        values vs returns; NaN, logged null, when undefined), kl_coef (used this step),
        kl_per_completion (the summed KL per completion that the adaptive controller targets), returns_mean, values_mean,
        advantages_mean (before whitening), reward_running_mean/std, updates (mini-batch steps
        taken), early_stopped; where the step's time went (utils.rl.StepTimes's names):
        time/generate_s, time/rewards_s, time/reference_s (the reference policy's pass),
        time/update_s (the PPO epochs: forward, backward, optimizer), time/step_s (the whole step;
        what the parts leave is the rollout's policy and value pass and GAE).
        """
        started = training.synced_clock()
        seed = self.hp.seed + 100_003 * step + 1_009 * self.accelerator.process_index  # per step and process
        kl_coef = self.kl_controller.value
        experience = self.collect(examples, seed, kl_coef)
        times = experience.pop("times")
        update_started = training.synced_clock()
        stats = self.update(experience, seed)
        times["time/update_s"] = training.synced_clock() - update_started
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()  # once per PPO step: early stopping makes the update count vary
        metrics = self.summarize(experience, stats)
        self.kl_controller.update(metrics["ppo/kl_per_completion"], n_steps=self.hp.rollout_batch_size)
        elapsed = training.synced_clock() - started
        generated_tokens = metrics.pop("generated_tokens")
        metrics.update({"learning_rate": learning_rate, "train/tokens_per_s": generated_tokens / elapsed,
                        "ppo/kl_coef": kl_coef, **times, "time/step_s": elapsed})
        return metrics

    def collect(self, examples: list[dict], seed: int, kl_coef: float) -> dict:
        """Rollout, scores, old/reference log-probs, values, KL-penalized rewards, GAE."""
        acc, hp, model = self.accelerator, self.hp, self.unwrapped
        started = training.synced_clock()
        # --- rollout ---
        rollout = sample_rollout(model.policy, self.tokenizer, [e["prompt"] for e in examples], hp, seed,
                                 acc.device)
        times = {"time/generate_s": training.synced_clock() - started, "time/reference_s": 0.0}
        results = [score(text, example, self.spec) for text, example in zip(rollout.texts, examples)]
        times["time/rewards_s"] = training.synced_clock() - started - times["time/generate_s"]
        scores = torch.tensor([r.total for r in results], dtype=torch.float32, device=acc.device)
        mask, responses, length = rollout.mask, rollout.responses, rollout.response_length
        logprobs, ref_logprobs, values = [], [], []
        with torch.no_grad():
            for rows in self._chunks(len(examples), hp.micro_batch_size):
                ids, attention = rollout.query_response[rows], rollout.attention_mask[rows]
                logits, value = model(ids, attention, length)
                logprobs.append(logprobs_from_logits(logits / hp.temperature, responses[rows]))
                values.append(value.float())
                reference_started = training.synced_clock()
                ref_logits = model.reference_logits(ids, attention, length)
                ref_logprobs.append(logprobs_from_logits(ref_logits / hp.temperature, responses[rows]))
                times["time/reference_s"] += training.synced_clock() - reference_started
        logprobs, ref_logprobs, values = (torch.cat(x) for x in (logprobs, ref_logprobs, values))

        # --- rewards: normalized, clipped score + per-token KL penalty ---
        if hp.normalize_rewards:
            self.reward_moments.update(acc.gather(scores))  # the same statistics on every process
            shaped = self.reward_moments.normalize(scores)
        else:
            shaped = scores
        shaped = shaped.clamp(-hp.reward_clip, hp.reward_clip)
        rewards, kl = kl_penalty_rewards(shaped, logprobs, ref_logprobs, mask, kl_coef)
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        # --- advantages (GAE), whitened over response tokens ---
        advantages, returns = compute_gae(rewards, values, mask, hp.gamma, hp.lam)
        return {"rollout": rollout, "results": results, "scores": scores, "logprobs": logprobs,
                "values": values, "kl": kl, "raw_advantages": advantages, "advantages": masked_whiten(advantages, mask),
                "returns": returns, "times": times}

    def update(self, experience: dict, seed: int) -> dict[str, list[float]]:
        """ppo_epochs passes over num_mini_batches shuffled mini-batches; stops early once approx-KL
        exceeds max_approx_kl. Returns each statistic per mini-batch update."""
        acc, hp = self.accelerator, self.hp
        rollout = experience["rollout"]
        mask, responses, length = rollout.mask, rollout.responses, rollout.response_length
        stats: dict[str, list[float]] = {"early_stopped": [0.0]}
        size = len(responses)
        mini_size = size // hp.num_mini_batches
        generator = torch.Generator().manual_seed(seed)
        for _epoch in range(hp.ppo_epochs):
            order = torch.randperm(size, generator=generator).to(acc.device)
            for start in range(0, size, mini_size):
                mini = order[start:start + mini_size]
                micro_batches = [mini[i:i + hp.micro_batch_size] for i in range(0, len(mini), hp.micro_batch_size)]
                totals: dict[str, float] = {}
                self.optimizer.zero_grad()
                for index, rows in enumerate(micro_batches):
                    weight = len(rows) / len(mini)
                    last = index == len(micro_batches) - 1  # all-reduce gradients once per mini-batch
                    with nullcontext() if last else acc.no_sync(self.model):
                        logits, values = self.model(rollout.query_response[rows], rollout.attention_mask[rows],
                                                    length)
                        logits = logits / hp.temperature
                        m = mask[rows]
                        pg_loss, clipfrac, approx_kl = policy_loss(
                            logprobs_from_logits(logits, responses[rows]), experience["logprobs"][rows],
                            experience["advantages"][rows], m, hp.clip_range)
                        vf_loss, vf_clipfrac = value_loss(values.float(), experience["values"][rows],
                                                          experience["returns"][rows], m, hp.clip_range_value)
                        entropy = masked_mean(entropy_from_logits(logits), m)
                        # loss = L_clip + vf_coef L_V - entropy_coef H
                        loss = pg_loss + hp.vf_coef * vf_loss - hp.entropy_coef * entropy
                        acc.backward(loss * weight)
                    record = {"policy_loss": pg_loss, "value_loss": vf_loss, "loss": loss, "clipfrac": clipfrac,
                              "value_clipfrac": vf_clipfrac, "approx_kl": approx_kl, "entropy": entropy}
                    for name, value in record.items():
                        totals[name] = totals.get(name, 0.0) + float(value.detach()) * weight
                grad_norm = acc.clip_grad_norm_(self.params, hp.max_grad_norm)
                self.optimizer.step()
                for name, value in {**totals, "grad_norm": float(grad_norm)}.items():
                    stats.setdefault(name, []).append(value)
                # early stop on the mean over processes, so that every process stops together
                if float(acc.reduce(torch.tensor(totals["approx_kl"], device=acc.device), "mean")) > hp.max_approx_kl:
                    stats["early_stopped"] = [1.0]
                    return stats
        return stats

    def summarize(self, experience: dict, stats: dict[str, list[float]]) -> dict:
        """Step metrics: per-completion values gathered from every process, the rest averaged.
        The reward entries are utils.rewards.reward_log's, the names and meanings TRL's GRPO and
        RLOO log, so the curves of every method compare directly."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rollout, mask = experience["rollout"], experience["rollout"].mask
        per_completion = {"kl_sum": experience["kl"].sum(1), "length": mask.sum(1),
                          "clipped": torch.tensor(rollout.truncated, dtype=torch.float32)}
        gathered = {name: acc.gather(column.to(acc.device).float()) for name, column in per_completion.items()}
        values, returns = experience["values"], experience["returns"]
        local = {name: sum(v) / len(v) for name, v in stats.items()}
        local.update(updates=float(len(stats["loss"])),
                     advantages_mean=float(masked_mean(experience["raw_advantages"], mask)),
                     returns_mean=float(masked_mean(returns, mask)), values_mean=float(masked_mean(values, mask)),
                     explained_variance=explained_variance(values, returns, mask))  # NaN when undefined: logged null
        mean = self._mean_over_processes(local)
        return {
            **reward_log(gather_object(experience["results"])),
            "kl": float(gathered["kl_sum"].sum() / gathered["length"].sum().clamp(min=1)),  # per token, as RLOO's
            "ppo/kl_per_completion": float(gathered["kl_sum"].mean()),  # what the KL controller targets
            "entropy": mean["entropy"],
            "completions/mean_length": float(gathered["length"].mean()),
            "completions/clipped_ratio": float(gathered["clipped"].mean()),
            "loss": mean["loss"],
            "grad_norm": mean["grad_norm"],
            **{f"ppo/{name}": mean[name] for name in (
                "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "explained_variance",
                "returns_mean", "values_mean", "advantages_mean", "updates", "early_stopped")},
            "ppo/reward_running_mean": self.reward_moments.mean,
            "ppo/reward_running_std": self.reward_moments.std,
            "generated_tokens": float(gathered["length"].sum()),
        }

    def _mean_over_processes(self, record: dict[str, float]) -> dict[str, float]:
        """Each named value averaged over the processes (one all-reduce for the whole record)."""
        names = list(record)
        reduced = self.accelerator.reduce(torch.tensor([record[name] for name in names],
                                                       device=self.accelerator.device), "mean").tolist()
        return {name: reduced[i] for i, name in enumerate(names)}

    @staticmethod
    def _chunks(n: int, size: int) -> list[slice]:
        return [slice(i, i + size) for i in range(0, n, size)]

    # --- checkpoints ---
    def save(self, folder: str | Path, info: dict | None = None, resumable: bool = True,
             extra: dict | None = None) -> Path:
        """A checkpoint folder (utils.training.save_policy: adapter, tokenizer, config.yaml, `info`
        as validation.json) plus value_head.pt and, when resumable, trainer_state.pt (optimizer,
        schedule, KL controller, reward statistics, RNG and `extra`, e.g. the step).
        Call on the main process only."""
        from utils.training import save_policy

        def write_extra(tmp: Path) -> None:
            torch.save(self.unwrapped.value_head.state_dict(), tmp / "value_head.pt")
            if resumable:
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "kl_controller": self.kl_controller.state_dict(),
                            "reward_moments": self.reward_moments.state_dict(),
                            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                            "hyperparams": asdict(self.hp), "extra": extra or {}}, tmp / "trainer_state.pt")

        return save_policy(self.unwrapped.policy, self.tokenizer, self.cfg, folder, info, write_extra=write_extra)

    def load_state(self, folder: str | Path) -> dict:
        """Restore trainer_state.pt (build_policy loads the adapter and value head); returns its `extra`."""
        state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        return state["extra"]
