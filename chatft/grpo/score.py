"""scripts/score_rewards.py: the reward functions of --stage grpo applied to a predictions file (inference.py
--input_file ... --output_file), so that held-out prompts are scored before and after training by the same rules
training used. Prints the mean of each function (None rewards left out) and writes them as JSON with --output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.grpo.rewards import checked, load_reward
from chatft.inference.evaluation import read_predictions


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="score_rewards.py", description=__doc__)
    p.add_argument(
        "--predictions", nargs="+", required=True, help="predictions JSONL file(s) of inference.py"
    )
    p.add_argument(
        "--reward_funcs", nargs="+", default=["accuracy"], help="as finetune.py --stage grpo takes them"
    )
    p.add_argument(
        "--max_completion_length", type=int, default=128, help="for the length reward (default: 128)"
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="tokenizer for the length reward's counts")
    p.add_argument("--output", help="write the means as JSON here")
    return p


def score_file(path: str, functions: list, tokenizer) -> dict[str, float | None]:
    rows = read_predictions(path)  # located errors: InferError, a ValueError
    completions = [r["prediction"] for r in rows]
    columns = {
        "reference": [r.get("reference", "") for r in rows],
        "tools": [r.get("tools", "") for r in rows],
        "file": [r.get("file", path) for r in rows],
        "record": [r.get("record", i + 1) for i, r in enumerate(rows)],
        "completion_ids": [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        if tokenizer
        else [[] for _ in completions],
    }
    means = {}
    for function in functions:
        rewards = [
            r for r in function([r.get("prompt", "") for r in rows], completions, **columns) if r is not None
        ]
        means[function.__name__] = round(sum(rewards) / len(rewards), 4) if rewards else None
    return means


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        functions = [checked(load_reward(s, args.max_completion_length)) for s in args.reward_funcs]
        tokenizer = None
        if "length" in args.reward_funcs:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
        results = {}
        for path in args.predictions:
            results[path] = score_file(path, functions, tokenizer)
    except (ValueError, OSError) as e:  # RewardError and InferError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, means in results.items():
        print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in means.items()))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0
