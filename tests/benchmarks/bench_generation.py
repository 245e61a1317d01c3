"""Batched generation vs one prompt at a time, same model and prompts, greedy (target: >= 4x at batch 16 on CPU).

    python tests/benchmarks/bench_generation.py
    python tests/benchmarks/bench_generation.py --data datasets/finqa_processed/val.jsonl --dtype float32
    python tests/benchmarks/bench_generation.py --data synthetic --model tiny --num_prompts 8

Model: models/SmolLM2-135M-Instruct when present, else a tiny random model (--model tiny forces it).
Prompts: datasets/finqa_processed/val.jsonl when present, else synthetic FinQA-format examples
(shorter contexts). Both runs go through utils.generation.generate; tokens/s counts generated
tokens (up to EOS). On a shared machine other processes skew both figures: rerun when idle.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from utils.generation import count_tokens, generate  # noqa: E402
from tests.fixtures.tiny_model import build_tiny_model  # noqa: E402
from utils.modeling import load_model, load_tokenizer  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DEFAULT_DATA = ROOT / "datasets" / "finqa_processed" / "val.jsonl"


def load_prompts(data: str | None, num_prompts: int) -> tuple[list, str]:
    path = Path(data) if data and data != "synthetic" else DEFAULT_DATA
    if data != "synthetic" and path.is_file():
        from utils.runs import read_jsonl
        return [row["prompt"] for row in read_jsonl(path)[:num_prompts]], str(path)
    if data and data != "synthetic":
        sys.exit(f"--data {data}: no such file (python 01_prepare_dataset.py writes it)")
    from utils.data import to_processed
    from utils.synthetic import generate as synthetic
    raw = synthetic(num_prompts * 10, seed=0)["train"][:num_prompts]
    return [to_processed(example, "train", "retrieved", source="synthetic")["prompt"] for example in raw], \
        "synthetic"


def timed(model, tokenizer, prompts, batch_size, max_new_tokens):
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       desc=f"batch {batch_size}")
    seconds = time.perf_counter() - start
    tokens = sum(n for output in outputs for n in output["num_tokens"])
    return outputs, tokens, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, or 'tiny' (default: the default model)")
    parser.add_argument("--data", default=None, help="processed JSONL, or 'synthetic' "
                        "(default: datasets/finqa_processed/val.jsonl when present, else synthetic)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (default: %(default)s)")
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a busy shared machine 1 can be faster")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model in (None, "tiny") and (args.model == "tiny" or not DEFAULT_MODEL.is_dir()):
        folder = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    else:
        folder = Path(args.model) if args.model else DEFAULT_MODEL
    model, tokenizer = load_model(str(folder), dtype=args.dtype), load_tokenizer(str(folder))
    prompts, source = load_prompts(args.data, args.num_prompts)
    lengths = sorted(count_tokens(tokenizer, tokenizer.apply_chat_template(p, add_generation_prompt=True,
                                                                           tokenize=False)) for p in prompts)
    print(f"model {folder.name} ({model.dtype}, {torch.get_num_threads()} threads), {len(prompts)} prompts "
          f"from {source} ({lengths[0]}-{lengths[-1]} prompt tokens), max_new_tokens {args.max_new_tokens}, greedy")

    generate(model, tokenizer, prompts[:1], max_new_tokens=2, show_progress=False)  # warm-up
    batched, batched_tokens, batched_s = timed(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
    single, single_tokens, single_s = timed(model, tokenizer, prompts, 1, args.max_new_tokens)
    same = sum(a == b for a, b in zip(batched, single))
    ratio = (batched_tokens / batched_s) / (single_tokens / single_s)
    print(f"one at a time: {single_tokens:5d} tokens in {single_s:7.1f}s = {single_tokens / single_s:7.1f} tokens/s")
    print(f"batch {args.batch_size:3d}:     {batched_tokens:5d} tokens in {batched_s:7.1f}s = "
          f"{batched_tokens / batched_s:7.1f} tokens/s")
    print(f"speed-up {ratio:.2f}x (target >= 4x: {'ok' if ratio >= 4 else 'BELOW'}); "
          f"identical greedy outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
