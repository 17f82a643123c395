"""scripts/make_preference_pairs.py: preference pairs from a prediction file of inference.py.

Each prediction row ({"file", "record", "prompt", "reference", "prediction", "reasoning", "answer", ...}) points back
at its data record. The pair is that record's conversation up to its last assistant turn, chosen = that turn as the
record has it (the reference answer, with its reasoning), rejected = the model's prediction: its answer, with its
reasoning as `reasoning_content` when it wrote some (a row of an older file, with no answer: its prediction). Written in the OpenAI-messages preference layout
({"messages", "chosen", "rejected"}), or {"prompt", "chosen", "rejected"} for input-output records. A row whose
prediction is empty or the same as the reference is left out and counted, as is a row whose record is no longer
there or no longer valid.

Exit status: 0 pairs written, 1 some rows left out for a bad record, 2 usage error (a missing file, nothing
written).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from chatft.data.convert import read_valid, to_record, write_records
from chatft.data.formats import DataFileError
from chatft.data.schema import Conversation, RecordError
from chatft.inference.evaluation import answer_of

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_preference_pairs.py",
        description="Preference pairs from inference.py predictions: chosen = the record's own answer, rejected = "
        "the prediction. Exit status: 0 written, 1 some rows left out for a bad record, 2 usage error.",
    )
    p.add_argument("--predictions", nargs="+", required=True, help="prediction files of inference.py (JSONL)")
    p.add_argument("--output", required=True, help="the pairs, as JSON lines (or a JSON array for .json)")
    return p


def pair_record(conv: Conversation, prediction: str, reasoning: str = "") -> dict:
    """The preference record: conv's last assistant turn is chosen, the prediction (its answer and reasoning)
    rejected."""
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    chosen = conv.messages[last]
    if conv.raw:
        return {"prompt": conv.messages[0].content, "chosen": chosen.content, "rejected": prediction}
    with_answer = Conversation([*conv.messages[:last], replace(chosen, loss=None)], tools=conv.tools)
    record = to_record(with_answer, "openai")
    written_chosen = record["messages"].pop()
    rejected = {"role": "assistant", "content": prediction}
    if reasoning:
        rejected["reasoning_content"] = reasoning
    return {**record, "chosen": written_chosen, "rejected": rejected}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    rows: list[dict] = []
    try:
        for path in args.predictions:
            rows += read_rows(path)
        sources = read_valid(sorted({r["file"] for r in rows}), log=lambda _m: None)
    except (OSError, ValueError, DataFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    conversations = {(f, line): conv for f, line, _, conv in sources.records}
    pairs, left_out, bad = [], [], 0
    for row in rows:
        where = f"{row['file']}:{row['record']}"
        conv = conversations.get((row["file"], row["record"]))
        raw = conv is not None and conv.raw  # raw text: a think block there is text
        prediction = row["prediction"] if raw else answer_of(row)
        reasoning = "" if raw else row.get("reasoning") or ""
        if conv is None:
            left_out.append(f"{where}: the record is not there or no longer valid")
            bad += 1
        elif not prediction.strip():
            left_out.append(f"{where}: empty prediction")
        elif prediction.strip() == row["reference"].strip():
            left_out.append(f"{where}: the prediction is the reference answer")
        else:
            try:
                pairs.append(pair_record(conv, prediction, reasoning))
            except RecordError as e:
                left_out.append(f"{where}: {e.field}: {e.message}")
                bad += 1
    if not pairs:
        print(f"error: no pair to write ({len(left_out)} row(s) left out)", file=sys.stderr)
        for line in left_out:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    write_records(pairs, args.output)
    print(f"pairs written: {len(pairs)} to {args.output}; rows left out: {len(left_out)}")
    for line in left_out:
        print(f"  {line}")
    return EXIT_INVALID if bad else EXIT_OK


def read_rows(path: str) -> list[dict]:
    rows = []
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        missing = [
            k
            for k in ("file", "record", "reference", "prediction")
            if not isinstance(row, dict) or k not in row
        ]
        if missing:
            raise ValueError(
                f"{path}:{n}: not a prediction row of inference.py (missing {', '.join(missing)})"
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prediction rows")
    return rows
