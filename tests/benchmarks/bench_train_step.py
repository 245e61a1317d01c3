"""Where an SFT step's time goes on this machine: the LoRA forward + backward of the default model per
example, by micro-batch size, dtype, logits on every position or on the answer only, and torch.compile.

    python tests/benchmarks/bench_train_step.py                      # ladder level-1 prompts (about 360 tokens)
    python tests/benchmarks/bench_train_step.py --batch_sizes 2 4 8 --compile

The same LoRA (the default config's r 16 on every linear layer) as 03, on train rows of a processed JSONL,
each configuration timed over --repeats steps after one warm-up step (median), alone on the cores. Printed:
seconds per step and per example, and each configuration's speed as a ratio to the first row, measured in
one sitting. A row's "answer-only logits" computes the vocabulary projection on the answer tokens alone
(`logits_to_keep`): the loss needs no more. TRL's trainers compute the loss with their fused LM head; the two
"fused head" rows time it as TRL runs it off CUDA (every position projected) and as the trainers here run
it (labelled positions only: utils.training.fused_head_scores_labels_only).

--rl_groups also times the update of a GRPO/RLOO step: --rl_groups prompts x --group_size completions, the
log-probs of the completions (TRL's fused head at temperature 0.8) forward and backward, once with TRL's one
pass per row and once with utils.rl.shared_prompt_logps (each distinct prompt once), and checks that the two
agree.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/ladder_l1/data/train.jsonl",
                        help="processed JSONL whose rows are the batch (default: %(default)s; make it with "
                             "python 01_prepare_dataset.py --dataset synthetic --levels 1 --output_dir DIR)")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="default: %(default)s")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8], help="default: 4 8")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="float32 and/or bfloat16 (default: float32, plus bfloat16 where the CPU has native bf16)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (slow to compile)")
    parser.add_argument("--rl_groups", type=int, default=0,
                        help="also time an RL update of this many prompts' groups (default: %(default)s, off)")
    parser.add_argument("--group_size", type=int, default=8, help="completions per prompt there (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default: %(default)s)")
    return parser.parse_args()


def main(args) -> int:
    import torch
    from unittest import mock

    import trl.trainer.utils as fused_head
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from utils.modeling import load_model, load_tokenizer
    from utils.training import fused_head_scores_labels_only

    trl_choice = fused_head._use_triton  # TRL's compact-projection choice, before anything wraps it
    if args.dtypes is None:
        args.dtypes = ["float32"] + (["bfloat16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    tokenizer = load_tokenizer(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()[:max(args.batch_sizes)]]
    results = []
    for dtype in args.dtypes:
        base = load_model(args.model, dtype="float32")
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # as TRL's SFTTrainer adds it
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
        model.train()
        variants = [("full logits", model, False), ("answer-only logits", model, True),
                    ("fused head, every pos.", model, "every"), ("fused head, labelled", model, "labelled")]
        if args.compile:
            variants.append(("compiled, answer-only", torch.compile(model), True))
        for batch_size in args.batch_sizes:
            texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows[:batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            answer = max(len(tokenizer(r["completion"][0]["content"])["input_ids"]) for r in rows[:batch_size]) + 2
            labels = batch["input_ids"].clone()
            labels[:, :-answer] = -100
            labels[batch["attention_mask"] == 0] = -100
            for name, net, answer_only in variants:
                times = []
                for step in range(args.repeats + 1):
                    started = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                        if answer_only in ("every", "labelled"):
                            # "every": TRL's own choice as it ships (compact on CUDA/XPU only); "labelled": the
                            # trainers' wrapper, installed inside the patch so the next variant sees TRL's again
                            with mock.patch.object(fused_head, "_use_triton", trl_choice):
                                if answer_only == "labelled":
                                    fused_head_scores_labels_only()
                                loss = net(**batch, labels=labels, fused_lm_head=True).loss
                        else:
                            if answer_only:
                                logits = net(**batch, logits_to_keep=answer + 1).logits[:, :-1].float()
                                target = labels[:, -answer:]
                            else:
                                logits = net(**batch).logits[:, :-1].float()
                                target = labels[:, 1:]
                            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                     target.reshape(-1), ignore_index=-100)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                    if step:  # the first step warms up caches (and compiles)
                        times.append(time.perf_counter() - started)
                seconds = statistics.median(times)
                results.append((dtype, batch_size, tuple(batch["input_ids"].shape), name, seconds))
                print(f"{dtype:<9} batch {batch_size} {str(tuple(batch['input_ids'].shape)):<10} {name:<22} "
                      f"{seconds:6.2f} s/step {seconds / batch_size:6.2f} s/example", flush=True)
    if args.rl_groups:
        results += rl_update_times(args, tokenizer, rows)
    reference = results[0][4] / results[0][1]
    flags = subprocess.run("grep -o -w 'amx_bf16\\|avx512_bf16\\|avx2' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    print(f"\n{'dtype':<9} {'batch':>5} {'shape':<10} {'variant':<22} {'s/step':>7} {'s/example':>9} {'speed':>6}")
    for dtype, batch_size, shape, name, seconds in results:
        print(f"{dtype:<9} {batch_size:>5} {str(shape):<10} {name:<22} {seconds:>7.2f} {seconds / batch_size:>9.2f} "
              f"{reference / (seconds / batch_size):>5.2f}x")
    print(f"speed: examples per second relative to the first row, one sitting; CPU flags: {' '.join(flags)}; "
          f"torch threads {torch.get_num_threads()}")
    return 0


def rl_update_times(args, tokenizer, rows) -> list[tuple]:
    """An RL update's forward + backward of the completions' log-probs, TRL's pass per row against one pass per
    prompt (float32); the rows are --rl_groups prompts, each with --group_size copies of its gold answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from utils.modeling import load_model
    from utils.rl import shared_prompt_logps

    base = load_model(args.model, dtype="float32")
    add_fused_lm_head(base, temperature=0.8, outputs=("log_probs", "entropy"))
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules="all-linear"))
    model.train()
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in rows[:args.rl_groups] for _ in range(args.group_size)]
    answers = [r["completion"][0]["content"] + "<|im_end|>" for r in rows[:args.rl_groups] for _ in range(args.group_size)]
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    answer = tokenizer(answers, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    ids = torch.cat([prompt["input_ids"], answer["input_ids"]], 1)
    mask = torch.cat([prompt["attention_mask"], answer["attention_mask"]], 1)
    keep = answer["input_ids"].size(1)

    def per_row():
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-keep] = -100
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -keep:]

    results, values = [], {}
    n = len(prompts)
    for name, logps in (("RL: a pass per row", per_row),
                        ("RL: a pass per prompt", lambda: shared_prompt_logps(model, ids, mask, keep)[0])):
        times = []
        for step in range(args.repeats + 1):
            started = time.perf_counter()
            values[name] = logps()
            (values[name] * answer["attention_mask"]).sum().backward()
            model.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        results.append(("float32", n, tuple(ids.shape), name, seconds))
        print(f"float32   batch {n} {str(tuple(ids.shape)):<10} {name:<22} {seconds:6.2f} s/step "
              f"{seconds / n:6.2f} s/example", flush=True)
    first, second = values.values()
    gap = ((first - second).abs() * answer["attention_mask"]).max().item()
    print(f"the two passes' log-probs differ by at most {gap:.2e} nats")
    return results


if __name__ == "__main__":
    sys.exit(main(parse_args()))
