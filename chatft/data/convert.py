"""The data tools scripts/convert_data.py and split_data.py, and what the data tools share: reading records with
their keys renamed (--map) and validated, writing JSON lines or a JSON array, the located problems and exit status.

Writing a Conversation as a record of a format (to_record, as_written) is writers.py; the formatting of published
data sets (format_advertise_gen.py, format_tool_alpaca.py) is formatters.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatft.data.formats import (
    FORMAT_NAMES,
    DataFileError,
    LoadedData,
    expand_paths,
    load_file,
    read_records,
)
from chatft.data.schema import Conversation, Problem, RecordError
from chatft.data.writers import as_written, to_record

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "ReadData",
    "as_written",
    "convert_data_main",
    "convert_records",
    "dedup",
    "parse_renames",
    "prompt_key",
    "read_valid",
    "rename_keys",
    "rendering_notes",
    "split",
    "split_data_main",
    "to_record",
    "write_records",
]

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------- files


def parse_renames(entries: list[str]) -> dict[str, str]:
    """`--map NEW=OLD` entries as {NEW: OLD}; ValueError for a malformed or repeated one."""
    renames: dict[str, str] = {}
    for entry in entries:
        new, sep, old = entry.partition("=")
        if not sep or not new or not old:
            raise ValueError(f"--map {entry!r}: expected NEW=OLD, e.g. --map instruction=question")
        if new in renames or old in renames.values():
            raise ValueError(f"--map {entry!r}: {new if new in renames else old!r} is mapped twice")
        renames[new] = old
    return renames


def rename_keys(record: dict, renames: dict[str, str]) -> dict:
    """A copy of `record` with each key OLD renamed NEW ({NEW: OLD}), in its place in the key order. A record that
    already has a NEW which is not itself renamed away is an error: the rename would overwrite it."""
    old_to_new = {old: new for new, old in renames.items()}
    for new, old in renames.items():
        if old in record and new in record and new not in old_to_new:
            raise RecordError(new, f"present together with {old!r}; --map {new}={old} would overwrite it")
    return {old_to_new.get(key, key): value for key, value in record.items()}


@dataclass
class ReadData:
    """records: (file, line, record as read (after --map), its Conversation) for every valid record, in order."""

    records: list[tuple[str, int, Any, Conversation]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    read: int = 0

    @property
    def invalid(self) -> int:
        return self.read - len(self.records)


def read_valid(
    paths: list[str],
    fmt: str = "auto",
    renames: dict[str, str] | None = None,
    log: Callable[[str], Any] = print,
) -> ReadData:
    """Read every record, rename its keys (`renames`), detect the format per file, validate with the data checker's
    rules (parse_record). Bad records become located Problems, never exceptions; DataFileError for a bad path."""
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise ValueError(f"format must be auto or one of {', '.join(FORMAT_NAMES)}; got {fmt!r}")
    data, loaded = ReadData(), LoadedData()
    raw: dict[str, dict[int, Any]] = {}
    for path in expand_paths(paths):
        name = str(path)
        data.files.append(name)
        items = [_renamed(name, item, renames or {}) for item in read_records(path)]
        raw[name] = {item[0]: item[1] for item in items if not isinstance(item, Problem)}
        load_file(name, items, fmt, log, loaded)
    data.records = [(name, line, raw[name][line], conv) for name, line, conv in loaded.records]
    data.problems, data.formats, data.read = loaded.problems, loaded.formats, loaded.records_read
    return data


_UNDETECTED = (
    "cannot detect the format: expected messages (openai), conversations (multi-turn, sharegpt), "
    "instruction+output (alpaca), prompt+response or content+summary (input-output); name the format with "
    "--input_format (convert_data can also rename keys with --map)"
)


def _renamed(
    name: str, item: tuple[int, Any] | Problem, renames: dict[str, str]
) -> tuple[int, Any] | Problem:
    if isinstance(item, Problem) or not renames or not isinstance(item[1], dict):
        return item
    try:
        return item[0], rename_keys(item[1], renames)
    except RecordError as e:
        return Problem(name, item[0], e.field, e.message)


def write_records(records: Iterable[Any], path: str) -> None:
    """JSON lines, or one JSON array when `path` ends with .json; non-ASCII text kept as it is (UTF-8)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        if out.suffix == ".json":
            json.dump(list(records), f, ensure_ascii=False, indent=2)
            f.write("\n")
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _sorted_problems(problems: list[Problem], files: list[str]) -> list[Problem]:
    rank = {name: i for i, name in enumerate(files)}
    return sorted(problems, key=lambda p: (rank.get(p.file, len(rank)), p.line))


def _print_problems(problems: list[Problem]) -> None:
    if problems:
        print(f"{len(problems)} invalid record(s):")
        print("\n".join(str(p) for p in problems))


def _not_a_file(path: str) -> str:
    return "not a file" if Path(path).exists() else "no such file"


def _usage_error(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------------- convert_data


def convert_records(data: ReadData, fmt: str) -> tuple[list[dict], list[Problem]]:
    """Each valid record written in `fmt`, or a Problem (field `(to FMT)`) where `fmt` cannot express it."""
    records, problems = [], []
    for name, line, _, conv in data.records:
        try:
            records.append(to_record(conv, fmt))
        except RecordError as e:
            problems.append(Problem(name, line, e.field, e.message))
    return records, problems


def rendering_notes(formats: dict[str, str], fmt: str) -> list[str]:
    """Where converting changes how records are rendered for training (raw vs chat template), say so."""
    notes = []
    for name, used in formats.items():
        if (used == "input-output") != (fmt == "input-output"):
            raw, chat = "raw (no chat markup)", "with the chat template"
            before, after = (raw, chat) if used == "input-output" else (chat, raw)
            notes.append(f"note: {name} ({used}) is rendered {before}; as {fmt} it will be rendered {after}")
    return notes


def make_convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert training data between formats (e.g. alpaca -> openai messages). Every record is "
        "validated with the data checker's rules; invalid records, and records the output format cannot express "
        "(e.g. tool calls in alpaca, several turns in input-output, an untrained assistant turn where the format "
        "has no loss flags), are listed as FILE:LINE: field: problem and left out, never changed. Non-ASCII text "
        "is written as it is. Prints the counts read, written and invalid. "
        "Exit status: 0 all converted, 1 some records invalid (the valid ones are still written), 2 usage error.",
    )
    p.add_argument("--input", nargs="+", required=True, help="one or more .json/.jsonl files or directories")
    p.add_argument(
        "--input_format", default="auto", choices=["auto", *FORMAT_NAMES], help="default: detected per file"
    )
    p.add_argument("--output_format", required=True, choices=FORMAT_NAMES)
    p.add_argument("--output", required=True, help="JSON lines; a JSON array when the name ends with .json")
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="NEW=OLD",
        help="rename the key OLD of every raw record to NEW before detecting the format and reading it "
        "(repeatable), e.g. --map instruction=question --map output=answer",
    )
    return p


def convert_data_main(argv: list[str] | None = None) -> int:
    args = make_convert_parser().parse_args(argv)
    try:
        data = read_valid(args.input, args.input_format, parse_renames(args.map))
    except (DataFileError, ValueError, OSError) as e:
        return _usage_error(e)
    for note in rendering_notes(data.formats, args.output_format):
        print(note)
    records, unexpressible = convert_records(data, args.output_format)
    try:
        write_records(records, args.output)
    except OSError as e:
        return _usage_error(e)
    problems = _sorted_problems(data.problems + unexpressible, data.files)
    _print_problems(problems)
    print(
        f"read {data.read}, written {len(records)}, invalid {data.invalid + len(unexpressible)} "
        f"({data.invalid} failed validation, {len(unexpressible)} cannot be expressed as {args.output_format})"
    )
    print(f"wrote {args.output}")
    return EXIT_INVALID if problems else EXIT_OK


# ---------------------------------------------------------------------------------------------------- split_data


def prompt_key(conv: Conversation) -> str:
    """The conversation up to its last assistant turn (tools included), as a string: equal keys ask the same."""
    last = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=len(conv.messages))
    head = [
        [m.role, m.content, m.name, [[c.name, c.arguments] for c in m.tool_calls]]
        for m in conv.messages[:last]
    ]
    return json.dumps([conv.tools, head], ensure_ascii=False, sort_keys=True)


def dedup(items: list[T], keys: list[str]) -> list[T]:
    """The first item of each key, in order."""
    seen: set[str] = set()
    kept = []
    for item, key in zip(items, keys, strict=True):
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def split(items: list[T], ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `seed`, then the first round(len × ratio) items are train, the rest test."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * ratio + 0.5)
    return shuffled[:n_train], shuffled[n_train:]


def make_split_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Shuffle a data file with a seed and split it into train and test files by ratio, optionally "
        "dropping records whose prompt (the conversation up to its last assistant turn) was seen before; train "
        "gets round(n × ratio) of the n records kept. Records are written unchanged (same format as the input). "
        "Records are validated with the data checker's rules; invalid ones are listed as FILE:LINE: field: "
        "problem and left out. Prints the counts read, invalid, duplicates removed, train and test. "
        "Exit status: 0 all valid, 1 some invalid (the split is still written), 2 usage error.",
    )
    p.add_argument("--input", required=True, help="a .json/.jsonl data file")
    p.add_argument(
        "--input_format",
        default="auto",
        choices=["auto", *FORMAT_NAMES],
        help="default: detected from the file",
    )
    p.add_argument(
        "--train_out", required=True, help="JSON lines; a JSON array when the name ends with .json"
    )
    p.add_argument("--test_out", required=True, help="JSON lines; a JSON array when the name ends with .json")
    p.add_argument(
        "--ratio", type=float, default=0.7, help="share of records for train, 0 to 1 (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default: %(default)s)")
    p.add_argument("--dedup", action="store_true", help="keep only the first record of each prompt")
    return p


def split_data_main(argv: list[str] | None = None) -> int:
    args = make_split_parser().parse_args(argv)
    if not 0.0 <= args.ratio <= 1.0:
        return _usage_error(ValueError(f"--ratio must be between 0 and 1, got {args.ratio}"))
    if Path(args.train_out).resolve() == Path(args.test_out).resolve():
        return _usage_error(ValueError("--train_out and --test_out must be different files"))
    if not Path(args.input).is_file():
        return _usage_error(DataFileError(f"{args.input}: {_not_a_file(args.input)}"))
    try:
        data = read_valid([args.input], args.input_format)
    except (DataFileError, ValueError, OSError) as e:
        return _usage_error(e)
    records = [(raw, conv) for _, _, raw, conv in data.records]
    kept = dedup(records, [prompt_key(conv) for _, conv in records]) if args.dedup else records
    train, test = split([raw for raw, _ in kept], args.ratio, args.seed)
    try:
        write_records(train, args.train_out)
        write_records(test, args.test_out)
    except OSError as e:
        return _usage_error(e)
    _print_problems(data.problems)
    print(
        f"read {data.read}, invalid {data.invalid}, duplicates removed {len(records) - len(kept)}, "
        f"train {len(train)}, test {len(test)}"
    )
    print(f"wrote {args.train_out} and {args.test_out}")
    return EXIT_INVALID if data.invalid else EXIT_OK
