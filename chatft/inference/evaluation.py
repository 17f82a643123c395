"""Batch prediction of data files, ROUGE/BLEU scores of predictions, and the before/after comparison of two
prediction files.

A reasoning model's prediction is split (chatft.inference.reasoning) into `reasoning` and `answer`; the scores are
the answer's against the reference answer, and, only when asked (score_reasoning), the reasoning's against the
record's own reasoning."""

from __future__ import annotations

import json
import shutil
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatft.data.formats import load_conversations
from chatft.data.schema import Conversation
from chatft.data.templates import Template, TemplateError, tool_call_text
from chatft.inference.common import InferError, one_line, to_stderr
from chatft.inference.generation import GenerationOptions, decode, generate, render_prompt
from chatft.inference.loading import Session, stop_token_ids
from chatft.inference.reasoning import prompt_opens_think, split_reasoning
from chatft.metrics import METRIC_NAMES, score

# prediction: all the model wrote; reasoning and answer: its two parts; reference(_reasoning): the record's ("" none)
PREDICTION_FIELDS = (
    "file", "record", "prompt", "reference", "reference_reasoning", "prediction", "reasoning", "answer"
)  # fmt: skip


@dataclass
class PromptItem:
    file: str
    record: int
    prompt: str
    ids: list[int]
    reference: str
    reference_reasoning: str = ""


def predict_file(
    session: Session,
    options: GenerationOptions,
    input_files: list[str],
    input_format: str,
    output_file: str,
    batch_size: int,
) -> int:
    """Predict the last assistant message of every valid record into output_file (JSONL); invalid records
    are listed with their FILE:LINE and counted. Returns the number of predictions written."""
    try:
        loaded = load_conversations(input_files, input_format, log=to_stderr)
    except ValueError as e:
        raise InferError(str(e)) from e
    items, problems = prompt_items(session, loaded.records)
    problems = [str(p) for p in loaded.problems] + problems
    for problem in problems:
        to_stderr(f"invalid record: {problem}")
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in predict_items(session, options, items, batch_size):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    invalid = f"; {len(problems)} invalid record(s) skipped, listed above" if problems else ""
    to_stderr(f"{len(items)} prediction(s) written to {output_file}{invalid}")
    return len(items)


def predict_items(
    session: Session, options: GenerationOptions, items: list[PromptItem], batch_size: int
) -> Iterator[dict]:
    """A row of PREDICTION_FIELDS per item, generated in batches (progress bar)."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc="predicting", file=sys.stderr) as bar:
        for batch in _chunks(items, batch_size):
            for item, new_ids in zip(batch, generate(session, [i.ids for i in batch], options), strict=True):
                text = decode(session, new_ids)
                reasoning, answer = split_reasoning(text, prompt_opens_think(item.prompt))
                yield {
                    "file": item.file,
                    "record": item.record,
                    "prompt": item.prompt,
                    "reference": item.reference,
                    "reference_reasoning": item.reference_reasoning,
                    "prediction": text,
                    "reasoning": reasoning,
                    "answer": answer,
                }
            bar.update(len(batch))


def generation_scores(
    model: Any,
    tokenizer: Any,
    template: Template | None,
    records: list[tuple[str, int, Conversation]],
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, float]:
    """ROUGE/BLEU of greedy answers to the records' last assistant turns, for evaluation during training."""
    stops = stop_token_ids(tokenizer, template, model.generation_config)
    session = Session(model, tokenizer, template, False, stops, str(model.device))
    items, _ = prompt_items(session, records)
    rows = list(predict_items(session, GenerationOptions(max_new_tokens), items, batch_size))
    return score_rows(rows)


def prompt_items(
    session: Session, records: list[tuple[str, int, Conversation]]
) -> tuple[list[PromptItem], list[str]]:
    items, problems = [], []
    for file, line, conv in records:
        try:
            prompt_conv, reference = split_last_answer(conv)
            text, ids = render_prompt(session, prompt_conv)
        except TemplateError as e:
            problems.append(f"{file}:{line}: {e}")
            continue
        reasoning = conv.messages[len(prompt_conv.messages)].reasoning or ""  # the answer's own
        items.append(PromptItem(file, line, text, ids, reference, reasoning))
    return items, problems


def split_last_answer(conv: Conversation) -> tuple[Conversation, str]:
    """(the conversation up to its last assistant message, that message's text) of a data record."""
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    message = conv.messages[last]
    reference = message.content
    if message.tool_calls:
        reference = (reference + "\n" if reference else "") + tool_call_text(message.tool_calls)
    if not any(m.role == "user" for m in conv.messages[:last]):
        raise TemplateError("no user message before the last assistant message")
    return Conversation(conv.messages[:last], tools=conv.tools, raw=conv.raw), reference


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_predictions(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise InferError(f"{path}: no such predictions file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InferError(f"{path}: not UTF-8 ({one_line(e)})") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InferError(f"{path}:{number}: invalid JSON ({one_line(e)})") from e
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("prediction", "reference")
        ):
            raise InferError(f"{path}:{number}: needs string fields prediction and reference")
        rows.append(row)
    if not rows:
        raise InferError(f"{path}: no predictions in it")
    return rows


def answer_of(row: dict) -> str:
    """What is scored of a prediction row: its answer (a file written before rows had one: its prediction)."""
    answer = row.get("answer")
    return answer if isinstance(answer, str) else row["prediction"]


def score_rows(rows: list[dict]) -> dict[str, float]:
    """ROUGE/BLEU of the answers against the reference answers."""
    return score([answer_of(r) for r in rows], [r["reference"] for r in rows])


def reasoning_rows(rows: list[dict], path: str) -> list[dict]:
    """The rows whose record has reasoning, for --score_reasoning."""
    kept = [
        r for r in rows if isinstance(r.get("reference_reasoning"), str) and r["reference_reasoning"].strip()
    ]
    if not kept:
        raise InferError(
            f"--score_reasoning: no row of {path} has a reference_reasoning (the record's reasoning)"
        )
    return kept


def score_reasoning_rows(rows: list[dict]) -> dict[str, float]:
    """ROUGE/BLEU of the predicted reasoning against the records' reasoning."""
    return score([r.get("reasoning") or "" for r in rows], [r["reference_reasoning"] for r in rows])


def evaluate_files(
    predictions: str, base_predictions: str | None, metrics_file: str | None, score_reasoning: bool = False
) -> int:
    """Score a predictions file's answers (and print the before/after comparison with base_predictions), and
    with score_reasoning its reasoning too (rows whose record has reasoning); the scores go to stdout and, as
    JSON, to metrics_file (default <predictions>.metrics.json)."""
    rows = read_predictions(predictions)
    scores = score_rows(rows)
    result: dict[str, Any] = {"predictions": predictions, "records": len(rows), "scores": scores}
    thought = reasoning_rows(rows, predictions) if score_reasoning else []
    if thought:
        result["reasoning"] = {"records": len(thought), "scores": score_reasoning_rows(thought)}
    if base_predictions:
        base_rows = read_predictions(base_predictions)
        check_same_records(base_rows, rows, base_predictions, predictions)
        base_scores = score_rows(base_rows)
        print(comparison_table(base_rows, rows, _terminal_width()))
        print(scores_side_by_side(base_scores, scores))
        result["base"] = {"predictions": base_predictions, "scores": base_scores}
        if thought:
            base_thought = score_reasoning_rows(reasoning_rows(base_rows, base_predictions))
            result["base"]["reasoning"] = {"scores": base_thought}
            print(f"reasoning, over {len(thought)} record(s) with reasoning:")
            print(scores_side_by_side(base_thought, result["reasoning"]["scores"]))
    else:
        print(format_scores(scores, len(rows)))
        if thought:
            print(format_scores(result["reasoning"]["scores"], len(thought), "reasoning scores"))
    target = Path(metrics_file or f"{predictions}.metrics.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    to_stderr(f"scores written to {target}")
    return 0


def check_same_records(base: list[dict], tuned: list[dict], base_path: str, tuned_path: str) -> None:
    if len(base) != len(tuned):
        raise InferError(f"--compare: {base_path} has {len(base)} predictions, {tuned_path} {len(tuned)}")
    for i, (a, b) in enumerate(zip(base, tuned, strict=True), start=1):
        if a["reference"] != b["reference"]:
            raise InferError(
                f"--compare: prediction {i} has another reference in {base_path} than in {tuned_path}"
            )


def format_scores(scores: dict[str, float], records: int, what: str = "scores") -> str:
    lines = [f"{what} over {records} record(s):"]
    lines += [f"  {name:<8} {scores[name]:8.4f}" for name in METRIC_NAMES]
    return "\n".join(lines)


def scores_side_by_side(base: dict[str, float], tuned: dict[str, float]) -> str:
    lines = [f"  {'metric':<8} {'base':>9} {'tuned':>9} {'change':>9}"]
    for name in METRIC_NAMES:
        lines.append(f"  {name:<8} {base[name]:9.4f} {tuned[name]:9.4f} {tuned[name] - base[name]:+9.4f}")
    return "\n".join(lines)


def comparison_table(base: list[dict], tuned: list[dict], width: int = 100) -> str:
    """Per record: prompt, reference, base answer, tuned answer, each on one shortened line."""
    blocks = []
    text_width = max(20, width - 14)
    for i, (a, b) in enumerate(zip(base, tuned, strict=True), start=1):
        where = f"{b.get('file', '?')}:{b.get('record', '?')}"
        rows = [("prompt", b.get("prompt", "")), ("reference", b["reference"])]
        rows += [("base", answer_of(a)), ("tuned", answer_of(b))]
        lines = [f"[{i}] {where}"] + [f"  {label:<10}| {shorten(text, text_width)}" for label, text in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def shorten(text: str, width: int) -> str:
    """One line (white space collapsed) of at most width terminal columns (a CJK character takes two): the
    head and the tail, joined by ' … '."""
    flat = " ".join(text.split())
    if _columns(flat) <= width:
        return flat
    keep = width - 3
    head = _fit(flat, keep // 2)
    tail = _fit(flat[::-1], keep - _columns(head))[::-1]
    return head + " … " + tail


def _columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fit(text: str, columns: int) -> str:
    """The longest start of text that fits in columns."""
    used = 0
    for i, c in enumerate(text):
        used += _columns(c)
        if used > columns:
            return text[:i]
    return text


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns
