"""Sample K candidate completions per prompt from a policy and score each with the reward.

    python 04_generate_candidates.py --policy_ckpt outputs/run_001/03_sft       # its ckpt_sft/best
    python 04_generate_candidates.py --policy_ckpt outputs/run_001/03_sft/ckpt_sft/step_50 --split val
    python 04_generate_candidates.py --quick_test                              # base model, 8 prompts
    python 04_generate_candidates.py --num_candidates 8 --temperature 1.0 --max_examples 200

Writes outputs/<run_id>/04_candidates/: candidates.jsonl (one line per prompt: id, prompt,
completions, num_tokens), scores.jsonl (one line per candidate: id, candidate, completion and
every RewardResult field), stats.json (parse rates, reward mean/std, pass@1, pass@k, diversity,
speed) and manifest.json. 08_build_prefs.py pairs these candidates into DPO preferences.
pass@1 is the unbiased estimate (mean over prompts of the fraction of correct candidates) and
pass@k the fraction of prompts with at least one correct candidate, correct = execution accuracy.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from utils import cli, runs
from utils import config as config_lib
from utils.data import read_processed
from utils.generation import generate
from utils.modeling import load_model, load_tokenizer, resolve_checkpoint, resolve_model_path
from utils.rewards import extract_response, score
from utils.training import resolve_reward_spec

MODULE = "04_candidates"
QUICK_TEST = {"max_examples": 8, "num_candidates": 2, "max_new_tokens": 48}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_common_args(parser)
    for action in parser._actions:  # here --batch_size is the generation batch, not the training one
        if action.dest == "batch_size":
            action.help = "prompts per generate call (default: the config's generation.batch_size)"
    parser.add_argument("--policy_ckpt", default=None,
                        help="a run folder (its SFT policy), a module folder (its ckpt_*/best), a ckpt_* folder, "
                             "a checkpoint folder, or a base model name; omitted: the config's base model")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train")
    parser.add_argument("--data_dir", default=None, help="processed JSONL folder (default: paths.data_dir)")
    parser.add_argument("--num_candidates", type=int, default=None,
                        help="completions per prompt (default: generation.num_candidates)")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: trims the unlikely tail so candidates stay well-formed JSON yet differ "
                             "(default: %(default)s)")
    parser.add_argument("--max_examples", type=int, default=None, help="first N prompts of the split")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="(default: generation.max_new_tokens)")
    parser.add_argument("--reward_spec", default=None,
                        help="reward_spec.yaml (default: outputs/<run_id>/02_rewards/reward_spec.yaml "
                             "if present, else the built-in defaults)")
    parser.add_argument("--quick_test", action="store_true",
                        help=f"smoke run: {QUICK_TEST['max_examples']} prompts, {QUICK_TEST['num_candidates']} candidates, "
                             f"{QUICK_TEST['max_new_tokens']} new tokens (explicit flags win)")
    return parser.parse_known_args(argv)


# --- helpers ---

def candidate_stats(rows: list[dict], scores: list[list]) -> dict:
    """Statistics over prompts (rows) and their scored candidates (scores[i][k] = (text, result))."""
    flat = [result for candidates in scores for _, result in candidates]
    totals = [result.total for result in flat]
    correct = [[result.exec_correct for _, result in candidates] for candidates in scores]
    n = max(len(flat), 1)
    return {
        "n_prompts": len(rows),
        "n_candidates": len(flat),
        "k": len(scores[0]) if scores else 0,
        "parse_rate": sum(r.format_valid for r in flat) / n,
        "json_parse_rate": sum(extract_response(text)[0] is not None for c in scores for text, _ in c) / n,
        "reward_mean": statistics.fmean(totals) if totals else 0.0,
        "reward_std": statistics.pstdev(totals) if totals else 0.0,
        "pass@1": statistics.fmean(sum(c) / len(c) for c in correct) if correct else 0.0,
        "pass@k": statistics.fmean(any(c) for c in correct) if correct else 0.0,
        "distinct_completions_per_prompt": (statistics.fmean(len(set(row["completions"])) for row in rows)
                                            if rows else 0.0),
    }


# --- main ---

def main(args, extra_tokens=()) -> dict:
    # --batch_size is this script's generation batch: keep it out of the training section
    cfg = config_lib.from_args(argparse.Namespace(**{**vars(args), "batch_size": None}), extra_tokens)
    quick = QUICK_TEST if args.quick_test else {}
    gen = cfg["generation"]  # the values used, so the manifest's config tells the truth
    gen.update(batch_size=args.batch_size or gen["batch_size"], temperature=args.temperature, top_p=args.top_p,
               num_candidates=args.num_candidates or quick.get("num_candidates") or gen["num_candidates"],
               max_new_tokens=args.max_new_tokens or quick.get("max_new_tokens") or gen["max_new_tokens"])
    max_examples = args.max_examples or quick.get("max_examples")
    seed = cfg["training"]["seed"]
    folder = runs.module_dir(args.run_id, MODULE, cfg["paths"]["output_dir"], cfg["paths"]["output_root"])
    runs.seed_everything(seed)
    with runs.Manifest(folder, MODULE, vars(args), cfg, seed) as manifest:
        # --- data ---
        data_path = Path(args.data_dir or cfg["paths"]["data_dir"]) / f"{args.split}.jsonl"
        if not data_path.is_file():
            raise FileNotFoundError(f"{data_path} not found: run `python 01_prepare_dataset.py` first "
                                 f"(or pass --data_dir FOLDER holding {args.split}.jsonl)")
        examples = read_processed(data_path)[:max_examples]  # prompts and what the reward reads
        manifest.add_input("data", data_path)
        spec, spec_path = resolve_reward_spec(args.reward_spec, cfg, args.run_id)
        if spec_path is not None:
            manifest.add_input("reward_spec", spec_path)

        # --- model ---
        policy = resolve_checkpoint(args.policy_ckpt) if args.policy_ckpt else resolve_model_path(cfg)
        if args.policy_ckpt is None:
            print(f"no --policy_ckpt: sampling from the base model {policy} (config {args.config})")
        if Path(policy).is_dir():
            manifest.add_input("checkpoint", policy)
        model = load_model(policy, dtype=cfg["model"]["dtype"])
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # the base weights' (a PeftModel's too)
        tokenizer = load_tokenizer(policy)
        if not tokenizer.chat_template and cfg["model"]["chat_template"]:
            tokenizer.chat_template = cfg["model"]["chat_template"]
        print(f"{len(examples)} prompts from {data_path} x {gen['num_candidates']} candidates, "
              f"temperature {gen['temperature']}, top_p {gen['top_p']}, {dtype}, "
              f"reward spec {spec_path or 'built-in defaults'}")

        # --- generate ---
        started = time.monotonic()
        outputs = generate(model, tokenizer, [example["prompt"] for example in examples],
                           max_new_tokens=gen["max_new_tokens"], batch_size=gen["batch_size"],
                           do_sample=gen["do_sample"], temperature=gen["temperature"], top_p=gen["top_p"],
                           num_return_sequences=gen["num_candidates"], seed=seed,
                           desc="candidates", checkpoint=policy)
        wall_time = time.monotonic() - started

        # --- score ---
        rows, scores, score_rows = [], [], []
        for example, output in zip(examples, outputs):
            rows.append({"id": example["id"], "prompt": example["prompt"], **output})
            scored = [(text, score(text, example, spec)) for text in output["completions"]]
            scores.append(scored)
            score_rows += [{"id": example["id"], "candidate": k, "completion": text, **result.to_dict()}
                           for k, (text, result) in enumerate(scored)]
        tokens = sum(n for output in outputs for n in output["num_tokens"])
        stats = {**candidate_stats(rows, scores), "tokens_generated": tokens,
                 "wall_time_s": round(wall_time, 3), "tokens_per_s": tokens / max(wall_time, 1e-9),
                 "split": args.split, "policy": policy, "dtype": dtype,
                 "reward_spec": str(spec_path) if spec_path else "built-in defaults"}
        for name, path, content in (("candidates", "candidates.jsonl", rows),
                                    ("scores", "scores.jsonl", score_rows), ("stats", "stats.json", stats)):
            write = runs.atomic_write_json if path.endswith(".json") else runs.atomic_write_jsonl
            manifest.add_output(name, write(folder / path, content))
        manifest.metrics.update(stats)
    print(f"parse_rate {stats['parse_rate']:.3f}  pass@1 {stats['pass@1']:.3f}  pass@{stats['k']} "
          f"{stats['pass@k']:.3f}  reward_mean {stats['reward_mean']:.3f}  "
          f"{stats['tokens_per_s']:.1f} tokens/s -> {folder}")
    return manifest.metrics


if __name__ == "__main__":
    cli.run(main, parse_args)
