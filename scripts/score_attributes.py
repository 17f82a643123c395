#!/usr/bin/env python
"""Score AdvertiseGen predictions side by side: ROUGE/BLEU of the answers and how many attributes they mention.

Each --run NAME=FILE is a predictions file of `inference.py --input_file ... --output_file FILE --eval` on records
of scripts/format_advertise_gen_reasoning.py: its ROUGE-1/2/L and BLEU-4 are read from FILE.metrics.json (written
by --eval: the answer without its reasoning against the reference ad). The attributes of a record are the values of
its content (类型#裙*颜色#蓝色 -> 裙, 蓝色), read back from the record's own file and line; a value is mentioned
when it occurs in the text literally (a loose measure: 裙 occurs in 半身裙). Per run, averaged over records:

- answer attrs: the share of the record's values its answer mentions (the reference ads' share is given beside);
- reasoning attrs: the share its reasoning mentions, for rows with reasoning;
- listed, not in record: of the items a reasoning lists after 要点： (split on 、), the share that are not a value of
  the record (made up);
- reasoning exact: reasoning equal to the record's own (scripts/format_advertise_gen_reasoning.py's);
- with reasoning / empty answers: rows whose reasoning is not empty; rows with no answer (a think block never closed
  within --max_new_tokens);
- answer chars: mean answer length in characters.
--cut_tokens N (with --tokenizer) adds the four scores of the answers cut to their first N tokens: a run whose
answer had a larger budget (reasoning given extra tokens, and short reasoning leaving them to the answer) is then
scored on answers no longer than the others'. --output writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from format_advertise_gen_reasoning import PREFIX, attribute_values, reasoning  # noqa: E402

from chatft.data.files import read_records  # noqa: E402
from chatft.metrics import METRIC_NAMES, score  # noqa: E402


def record_contents(path: str) -> dict[int, str]:
    """line -> the user message of each record of a formatted file (openai messages)."""
    out = {}
    for item in read_records(Path(path)):
        if isinstance(item, tuple):
            line, raw = item
            user = next(m["content"] for m in raw["messages"] if m["role"] == "user")
            out[line] = user
    return out


def share(values: list[str], text: str) -> float:
    return sum(v in text for v in values) / len(values) if values else 0.0


def listed(reasoning_text: str) -> list[str]:
    body = reasoning_text.strip().split(PREFIX, 1)[-1]
    return [item.strip() for item in body.split("、") if item.strip()]


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cut(tokenizer, text: str, n: int) -> str:
    """The first n tokens of text, without a character split at the cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n]).rstrip("\ufffd")


def score_run(path: Path, contents: dict[str, dict[int, str]], tokenizer=None, cut_tokens: int = 0) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answer, reference, think, made_up, exact, chars = [], [], [], [], [], []
    for row in rows:
        if row["file"] not in contents:
            contents[row["file"]] = record_contents(row["file"])
        content = contents[row["file"]][row["record"]]
        values = attribute_values(content)
        text = row.get("answer", row["prediction"])
        answer.append(share(values, text))
        reference.append(share(values, row["reference"]))
        chars.append(len(text))
        if row.get("reasoning"):
            think.append(share(values, row["reasoning"]))
            items = listed(row["reasoning"])
            made_up.append(sum(i not in values for i in items) / len(items) if items else 1.0)
            exact.append(float(row["reasoning"].strip() == reasoning(content)))
    metrics_file = Path(f"{path}.metrics.json")
    metrics = json.loads(metrics_file.read_text())["scores"] if metrics_file.exists() else {}
    cut_scores = {}
    if cut_tokens:
        answers = [cut(tokenizer, row.get("answer", row["prediction"]), cut_tokens) for row in rows]
        cut_scores = score(answers, [row["reference"] for row in rows])
    return {
        "records": len(rows),
        "scores": metrics,
        "cut_scores": cut_scores,
        "answer_attributes": mean(answer),
        "reference_attributes": mean(reference),
        "reasoning_attributes": mean(think),
        "listed_not_in_record": mean(made_up),
        "reasoning_exact": mean(exact),
        "with_reasoning": len(think),
        "empty_answers": sum(not row.get("answer", row["prediction"]).strip() for row in rows),
        "answer_chars": mean(chars),
    }


def table(results: dict[str, dict], cut_tokens: int = 0) -> str:
    names = list(results)
    width = max(12, *(len(n) for n in names))

    def line(label: str, cells: list[str]) -> str:
        return f"  {label:<24}" + "".join(f"{c:>{width + 2}}" for c in cells)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    out = [line("", names)]
    for metric in METRIC_NAMES:
        out.append(
            line(
                metric,
                [f"{r['scores'][metric]:.2f}" if metric in r["scores"] else "-" for r in results.values()],
            )
        )
    for metric in METRIC_NAMES if cut_tokens else ():
        out.append(
            line(
                f"{metric}, {cut_tokens} tokens", [f"{r['cut_scores'][metric]:.2f}" for r in results.values()]
            )
        )
    first = next(iter(results.values()))
    out += [
        line("answer attrs", [pct(r["answer_attributes"]) for r in results.values()]),
        line("reasoning attrs", [pct(r["reasoning_attributes"]) for r in results.values()]),
        line("listed, not in record", [pct(r["listed_not_in_record"]) for r in results.values()]),
        line("reasoning exact", [pct(r["reasoning_exact"]) for r in results.values()]),
        line("with reasoning", [f"{r['with_reasoning']}/{r['records']}" for r in results.values()]),
        line("empty answers", [f"{r['empty_answers']}/{r['records']}" for r in results.values()]),
        line("answer chars", [f"{r['answer_chars']:.0f}" for r in results.values()]),
        f"  (the reference ads mention {pct(first['reference_attributes'])} of their records' attribute values)",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=FILE", help="a predictions file")
    p.add_argument("--cut_tokens", type=int, default=0, help="also score the answers cut to this many tokens")
    p.add_argument("--tokenizer", help="the tokenizer folder for --cut_tokens")
    p.add_argument("--output", help="write the figures here as JSON")
    args = p.parse_args(argv)
    tokenizer = None
    if args.cut_tokens:
        if not args.tokenizer:
            print("error: --cut_tokens needs --tokenizer", file=sys.stderr)
            return 2
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    results, contents = {}, {}
    for run in args.run:
        name, sep, file = run.partition("=")
        if not sep or not Path(file).is_file():
            print(f"error: --run {run!r}: expected NAME=FILE with an existing file", file=sys.stderr)
            return 2
        try:
            results[name] = score_run(Path(file), contents, tokenizer, args.cut_tokens)
        except FileNotFoundError as e:  # a row's "file" is relative to where inference.py ran
            print(
                f"error: {file}: its records' file {e.filename} not found (run from where inference.py ran)",
                file=sys.stderr,
            )
            return 2
    print(table(results, args.cut_tokens))
    if args.output:
        Path(args.output).write_text(
            json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
