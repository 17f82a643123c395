#!/usr/bin/env python
"""Arithmetic word problems with their answers, for --stage grpo's accuracy reward: OpenAI-messages JSON lines,
each a user question and the assistant's answer (the number). Deterministic for a seed.

    python scripts/make_arithmetic.py --out output/arith/train.jsonl --count 200 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TEMPLATES = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", lambda a, b: a + b),
    ("{name} had {a} stickers and gave away {b}. How many stickers are left?", lambda a, b: a - b),
    ("A box holds {a} pencils. How many pencils are in {b} boxes?", lambda a, b: a * b),
    ("{name} reads {a} pages a day. How many pages does {name} read in {b} days?", lambda a, b: a * b),
]
NAMES = ["Ana", "Ben", "Chen", "Dina", "Eli", "Fatima", "Goro", "Hana"]
INSTRUCTION = " Put the final number after 'Answer:'."


def problems(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text, solve = rng.choice(TEMPLATES)
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        a, b = (max(a, b), min(a, b)) if "left" in text else (a, b)
        question = text.format(name=rng.choice(NAMES), a=a, b=b) + INSTRUCTION
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": f"Answer: {solve(a, b)}"}]})  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines file to write")
    p.add_argument("--count", type=int, default=200, help="how many problems (default: 200)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    args = p.parse_args()
    if args.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return 2
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in problems(args.count, args.seed))
    )
    print(f"{args.count} problems written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
