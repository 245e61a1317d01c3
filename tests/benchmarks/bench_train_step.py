"""Where an SFT step's time goes on this machine: the LoRA forward + backward of the default model per
example, by micro-batch size, dtype, logits on every position or on the answer only, and torch.compile.

    python tests/benchmarks/bench_train_step.py                      # ladder level-1 prompts (about 360 tokens)
    python tests/benchmarks/bench_train_step.py --batch_sizes 2 4 8 --compile

The same LoRA (the default config's r 16 on every linear layer) as 03, on train rows of a processed JSONL,
each configuration timed over --repeats steps after one warm-up step (median), alone on the cores. Printed:
seconds per step and per example, and each configuration's speed as a ratio to the first row, measured in
one sitting. A row's "answer-only logits" computes the vocabulary projection on the answer tokens alone
(`logits_to_keep`): the loss needs no more, but TRL's SFTTrainer computes logits for every position.
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
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default: %(default)s)")
    return parser.parse_args()


def main(args) -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.modeling import load_model, load_tokenizer

    if args.dtypes is None:
        args.dtypes = ["float32"] + (["bfloat16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    tokenizer = load_tokenizer(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()[:max(args.batch_sizes)]]
    results = []
    for dtype in args.dtypes:
        base = load_model(args.model, dtype="float32")
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
        model.train()
        variants = [("full logits", model, False), ("answer-only logits", model, True)]
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


if __name__ == "__main__":
    sys.exit(main(parse_args()))
