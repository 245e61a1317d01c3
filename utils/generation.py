"""Batched generation from chat prompts, shared by SFT validation, candidates (04), RL and evaluation.

    from utils.generation import generate
    outputs = generate(model, tokenizer, [example["prompt"] for example in examples],
                       max_new_tokens=96, batch_size=8, do_sample=True, temperature=0.8,
                       top_p=0.9, num_return_sequences=4, seed=0, checkpoint="ckpt_sft/best")
    outputs[0]  # {"completions": [4 strings], "num_tokens": [4 ints]}

Prompts are sorted by length so each batch pads little, left-padded (a decoder continues from
the last position of every row), generated with the KV cache and stopped at EOS; the results
come back in input order. When sampling K completions, each prompt runs through the model once
and its KV cache is copied K times (transformers would run the prompt K times). NaN or +inf
logits end the batch in NonFiniteLogitsError instead of transformers' opaque "probability
tensor contains inf/nan".
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from utils.cli import JobFailed


class NonFiniteLogitsError(JobFailed):
    """The model produced NaN or +inf logits: its weights (a corrupt checkpoint) or its dtype are broken.
    The command was fine and the job ran into it, so it exits 1, not as a usage error."""


class FiniteLogitsCheck(LogitsProcessor):
    """Find NaN/+inf logits without a host sync per token; raise() once after generation.

    Reading a GPU flag every token (bool(...)) would stall the GPU once per generated token, so the
    check keeps, on the device, the first generated token at which each row broke, and gives broken
    rows uniform scores so sampling carries on instead of failing inside torch; raise_if_broken()
    reads that once. -inf is left alone: processors use it to mask tokens, but a row that is all
    -inf has no token left to sample and counts as broken. Custom processors run after
    transformers' own and before the sampling warpers (temperature, top-p), so this sees the
    model's logits as they reach sampling.
    """

    def __init__(self, prompt_length: int, checkpoint: str | None):
        self.prompt_length = prompt_length
        self.checkpoint = checkpoint
        self.first_broken = None  # per row: the generated token it first broke at, -1 while fine

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # generate() upcasts to float32, but an fp16 model's logits can overflow to inf before that
        values = scores.float()
        broken = torch.isnan(values).any(-1) | torch.isposinf(values).any(-1) | torch.isneginf(values).all(-1)
        if self.first_broken is None:
            self.first_broken = torch.full_like(broken, -1, dtype=torch.long)
        step = input_ids.shape[1] - self.prompt_length
        self.first_broken = torch.where(broken & (self.first_broken < 0), step, self.first_broken)
        return torch.where(broken[:, None], torch.zeros_like(scores), scores)

    def raise_if_broken(self) -> None:
        if self.first_broken is None or not bool((self.first_broken >= 0).any()):  # the one host sync
            return
        rows = (self.first_broken >= 0).nonzero().flatten().tolist()
        step = int(self.first_broken[rows].min())
        raise NonFiniteLogitsError(
            f"checkpoint {self.checkpoint or '<unnamed model>'} produced NaN/inf logits at generated "
            f"token {step} (batch rows {rows[:8]}); the weights may be corrupt (a diverged training "
            f"run) or overflow in half precision: try dtype float32 (--model.dtype float32)")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of a plain text, without the special tokens the tokenizer would add."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the generation config's (some models end turns with several)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _context_length(model, tokenizer) -> int | None:
    length = getattr(model.config, "max_position_embeddings", None)
    if length is None and tokenizer.model_max_length < 1_000_000:  # the unset value is ~1e30
        length = tokenizer.model_max_length
    return length


def _left_pad(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


def shared_prefix_cache(model, input_ids, attention_mask, prefix_len: int, position_ids=None):
    """The KV cache of every row's first `prefix_len` tokens, each distinct prefix computed once and
    indexed out to its rows (a differentiable gather: under autograd every row's gradient flows back
    into its prefix's single pass); None when no two rows share a prefix (nothing to save).
    position_ids: the prefix's positions, when the pass after it will not count pads (generate)."""
    if prefix_len < 1:
        return None
    prefix, prefix_mask = input_ids[:, :prefix_len], attention_mask[:, :prefix_len]
    _, row_prefix = torch.unique(torch.cat([prefix * prefix_mask, prefix_mask], dim=1), dim=0, return_inverse=True)
    n_prefixes, n_rows = int(row_prefix.max()) + 1, input_ids.size(0)
    if n_prefixes == n_rows:
        return None
    rows = torch.arange(n_rows, device=input_ids.device)
    first_row = torch.full((n_prefixes,), n_rows, device=input_ids.device).scatter_reduce(
        0, row_prefix, rows, reduce="amin")
    cache = model(input_ids=prefix[first_row], attention_mask=prefix_mask[first_row], use_cache=True, logits_to_keep=1,
                  position_ids=None if position_ids is None else position_ids[first_row, :prefix_len]).cache
    cache.batch_select_indices(row_prefix)  # prefix -> row
    return cache


def _share_prompt_cache(model, batch: dict, copies: int) -> dict:
    """Each prompt's `copies` sample rows over one KV cache of the prompt.

    num_return_sequences repeats the prompt before the forward pass, so K candidates of a
    500-token prompt would cost K prompt passes. Here every prompt token but the last goes
    through the model once; generate() then runs only the last one, on each copy.
    """
    input_ids, mask = batch["input_ids"].repeat_interleave(copies, 0), batch["attention_mask"].repeat_interleave(copies, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # numbered as generate() numbers left-padded rows
    cache = shared_prefix_cache(model, input_ids, mask, input_ids.size(1) - 1, positions)
    return {"input_ids": input_ids, "attention_mask": mask, "cache": cache}


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int | None = None, desc: str = "generating",
             checkpoint: str | None = None, show_progress: bool = True, token_ids: bool = False) -> list[dict]:
    """Generate completions for chat prompts, batched.

    Args:
        model: a causal LM (plain or peft); it is put in eval mode and its mode restored after.
        tokenizer: its tokenizer, with a chat template.
        prompts: chat messages per prompt (a processed example's "prompt").
        max_new_tokens: generation budget per completion.
        batch_size: prompts per `model.generate` call (each gives num_return_sequences rows).
        do_sample, temperature, top_p: sampling; greedy when do_sample is False (then the
            num_return_sequences completions are copies of one greedy completion).
        num_return_sequences: completions per prompt.
        seed: seeds each batch (seed + batch index), so the same prompts, batch size and seed
            give the same samples whatever ran before; the caller's RNG state is kept.
        desc: progress bar label.
        checkpoint: named in NonFiniteLogitsError.
        show_progress: show a tqdm bar over prompts.
        token_ids: also return the token ids (PPO scores the sampled tokens themselves:
            re-tokenizing decoded text need not give them back).
    Returns:
        In input order, {"completions": [str] * K, "num_tokens": [int] * K}: texts of the new
        tokens without special tokens, and the generated token counts up to and including the
        first EOS (padding after it is not counted). With token_ids, also "prompt_ids" (the
        templated prompt), "completion_ids" ([list[int]] * K, up to and including the EOS) and
        "finished" ([bool] * K: ended with an EOS within max_new_tokens).
    Raises:
        ValueError when a prompt does not fit the model's context; NonFiniteLogitsError.
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("num_return_sequences", num_return_sequences)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # the template already writes the special tokens (BOS, <|im_start|>): add none
    prompt_token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    context = _context_length(model, tokenizer)
    for index, ids in enumerate(prompt_token_ids):
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it exceeds "
                f"the model's context of {context} tokens. Lower max_new_tokens or shorten the context "
                f"(python 01_prepare_dataset.py --context_mode full --max_prompt_tokens N)")

    eos_ids = _eos_ids(model, tokenizer)
    eos_set = set(eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    copies = num_return_sequences if do_sample else 1  # greedy: K identical rows would be wasted work
    options = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_id,
                   eos_token_id=eos_ids, do_sample=do_sample)
    if do_sample:  # top_k=0: pure temperature + nucleus sampling, as TRL's trainers sample
        options.update(temperature=temperature, top_p=top_p, top_k=0)

    order = sorted(range(len(prompt_token_ids)), key=lambda i: -len(prompt_token_ids[i]))  # stable: ties keep input order
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(prompt_token_ids)
    was_training = model.training
    model.eval()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), torch.inference_mode(), \
                tqdm(total=len(order), desc=desc, disable=not show_progress, mininterval=5, unit="prompt") as bar:
            for batch_index, start in enumerate(range(0, len(order), batch_size)):
                indices = order[start:start + batch_size]
                batch = _left_pad([prompt_token_ids[i] for i in indices], pad_id, device)
                width = batch["input_ids"].shape[1]
                if seed is not None:
                    torch.manual_seed(seed + batch_index)
                if copies > 1:
                    batch = _share_prompt_cache(model, batch, copies)
                check = FiniteLogitsCheck(width, checkpoint)
                output = model.generate(**batch, **options, logits_processor=LogitsProcessorList([check]))
                check.raise_if_broken()
                new_tokens = output[:, width:].tolist()  # rows are prompt-major: prompt i's copies together
                ends = [next((t + 1 for t, token in enumerate(row) if token in eos_set), None) for row in new_tokens]
                counts = [end or len(row) for end, row in zip(ends, new_tokens)]
                texts = tokenizer.batch_decode([row[:n] for row, n in zip(new_tokens, counts)],
                                               skip_special_tokens=True)
                repeat = num_return_sequences // copies  # greedy: the one completion, K times
                for position, index in enumerate(indices):
                    rows = slice(position * copies, (position + 1) * copies)
                    results[index] = {"completions": texts[rows] * repeat, "num_tokens": counts[rows] * repeat}
                    if token_ids:
                        results[index].update(prompt_ids=prompt_token_ids[index], completion_ids=[
                            row[:n] for row, n in zip(new_tokens[rows], counts[rows])] * repeat,
                            finished=[end is not None for end in ends[rows]] * repeat)
                bar.update(len(indices))
    finally:
        model.train(was_training)
    return results
