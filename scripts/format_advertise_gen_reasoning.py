#!/usr/bin/env python
"""Format AdvertiseGen ({content, summary} lines) as OpenAI-messages JSON lines whose answer has reasoning.

Each record becomes {"messages": [user: content, assistant: summary with reasoning_content]}; the reasoning lists
the attributes the ad must mention, built from the content alone: "要点：" and the attribute values of the content
("类型#裙*颜色#蓝色*风格#简约" -> "要点：裙、蓝色、简约"), in their order, each value once. It is deterministic and
short (about 40 tokens of SmolLM2's tokenizer on the dev split, at most 85); the attribute names (类型, 颜色, ...)
are left out because the ad never names them. --no_reasoning_out writes the same records without reasoning, for
the same run without it. A line that is not JSON, lacks content or summary, or has a content pair without `#` is
reported as FILE:LINE: field: problem and left out (exit status 1; 0 when all were written, 2 usage error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.files import read_records  # noqa: E402
from chatft.data.schema import Problem  # noqa: E402

PREFIX = "要点："


def attributes(content: str) -> list[tuple[str, str]]:
    """The (name, value) pairs of an AdvertiseGen content string "类型#裙*颜色#蓝色"; ValueError for a bad pair."""
    pairs = []
    for part in content.split("*"):
        name, sep, value = part.partition("#")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{part!r} is not name#value")
        pairs.append((name.strip(), value.strip()))
    return pairs


def attribute_values(content: str) -> list[str]:
    """The values of the content's attributes, in order, each once: what the ad should mention."""
    values: list[str] = []
    for _, value in attributes(content):
        if value not in values:
            values.append(value)
    return values


def reasoning(content: str) -> str:
    return PREFIX + "、".join(attribute_values(content))


def record(raw: object, with_reasoning: bool) -> dict:
    if not isinstance(raw, dict):
        raise KeyError("record", "not a JSON object")
    for key in ("content", "summary"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise KeyError(key, "missing or not a non-empty string")
    answer = {"role": "assistant", "content": raw["summary"]}
    try:
        if with_reasoning:
            answer = {
                "role": "assistant",
                "reasoning_content": reasoning(raw["content"]),
                "content": raw["summary"],
            }
        else:
            attributes(raw["content"])  # the same records are valid in both files
    except ValueError as e:
        raise KeyError("content", str(e)) from None
    return {"messages": [{"role": "user", "content": raw["content"]}, answer]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="an AdvertiseGen file (JSON lines of {content, summary})")
    p.add_argument("--out", required=True, help="JSON lines with reasoning_content")
    p.add_argument("--no_reasoning_out", help="also write the same records without reasoning here")
    p.add_argument("--limit", type=int, help="only the first N valid records")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.is_file():
        print(f"error: {path}: not a file", file=sys.stderr)
        return 2
    outputs = {args.out: True} | ({args.no_reasoning_out: False} if args.no_reasoning_out else {})
    rows: dict[str, list[dict]] = {out: [] for out in outputs}
    read = invalid = 0
    for item in read_records(path):
        if args.limit is not None and len(rows[args.out]) >= args.limit:
            break
        read += 1
        if isinstance(item, Problem):
            print(item, file=sys.stderr)
            invalid += 1
            continue
        line, raw = item
        try:
            built = {out: record(raw, with_reasoning) for out, with_reasoning in outputs.items()}
        except KeyError as e:
            field, message = e.args
            print(f"{path}:{line}: {field}: {message}", file=sys.stderr)
            invalid += 1
            continue
        for out, value in built.items():
            rows[out].append(value)
    for out, values in rows.items():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(v, ensure_ascii=False) + "\n" for v in values)
    written = len(rows[args.out])
    print(f"read {read} records, written {written}, invalid {invalid}")
    for out, with_reasoning in outputs.items():
        print(f"wrote {out} ({'with' if with_reasoning else 'without'} reasoning)")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
