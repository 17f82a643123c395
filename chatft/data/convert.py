"""Writers (the inverse of the readers in formats.py) and the data construction tools built on them:
scripts/convert_data.py, split_data.py, format_advertise_gen.py and format_tool_alpaca.py.

`to_record(conv, fmt)` writes a Conversation as one record of `fmt`, and `parse_record(record, fmt)` reads back the
same Conversation. Where `fmt` cannot express the conversation (tool calls in alpaca, several turns in input-output,
a tool result without its tool's name in multi-turn, ...) it raises RecordError: nothing is dropped or changed
silently. Two things follow the format rather than the conversation (`as_written` says exactly what reads back):
- `raw`: input-output records are rendered without chat markup, every other format with the chat template;
- a `loss` flag equal to the default (true on an assistant turn, false elsewhere) is left out where the format has
  no per-message flags (input-output, alpaca, sharegpt, and multi-turn's observations): training is the same.
  A flag that differs from the default there (an untrained assistant turn) cannot be expressed: RecordError.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from chatft.data.formats import (
    FORMAT_NAMES,
    DataFileError,
    LoadedData,
    expand_paths,
    load_file,
    parse_record,
    read_records,
)
from chatft.data.schema import Conversation, Message, Problem, RecordError, ToolCall

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")

_JSON_TYPES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list"}


def _json_type(value: Any) -> str:
    return "object" if isinstance(value, dict) else _JSON_TYPES.get(type(value), type(value).__name__)


def _json_error(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON: {error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {error}"


# ---------------------------------------------------------------------------------------------------- writers


def _cannot(fmt: str, message: str) -> RecordError:
    return RecordError(f"(to {fmt})", message)


def _which(index: int, message: Message) -> str:
    return f"message {index + 1} ({message.role})"


def _has_loss_flag(fmt: str, message: Message) -> bool:
    """Whether records of `fmt` have a place for this message's `loss`."""
    return fmt == "openai" or (fmt == "multi-turn" and message.role != "tool")


def as_written(conv: Conversation, fmt: str) -> Conversation:
    """The conversation that `parse_record(to_record(conv, fmt), fmt)` gives: `raw` as `fmt` renders it, and loss
    flags equal to the default left out where `fmt` has no place for them. RecordError for a flag that differs."""
    messages = []
    for i, m in enumerate(conv.messages):
        if m.loss is None or _has_loss_flag(fmt, m):
            messages.append(m)
        elif m.loss == (m.role == "assistant"):
            messages.append(replace(m, loss=None))
        elif m.role == "assistant":
            raise _cannot(fmt, f"{_which(i, m)} has loss: false; {fmt} cannot mark a turn untrained")
        else:
            raise _cannot(fmt, f"{_which(i, m)} has loss: true; {fmt} has no loss flag there")
    return Conversation(messages, tools=conv.tools, raw=fmt == "input-output")


def to_record(conv: Conversation, fmt: str) -> dict:
    """`conv` as one record of `fmt` (a format of FORMAT_NAMES). Raises RecordError, field `(to FMT)`, where `fmt`
    cannot express it; the record is checked to read back as `as_written(conv, fmt)`."""
    writer = _WRITERS.get(fmt)
    if writer is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_NAMES)}")
    expected = as_written(conv, fmt)
    record = writer(expected)
    try:
        back = parse_record(record, fmt)
    except RecordError as e:
        raise _cannot(fmt, f"the written record would be invalid: {e.field}: {e.message}") from None
    if back != expected:
        raise _cannot(fmt, "the written record would read back as a different conversation")
    return record


def _with_loss(item: dict, loss: bool | None) -> dict:
    return item if loss is None else {**item, "loss": loss}


def _with_tools(body: dict, tools: Any) -> dict:
    return body if tools is None else {"tools": tools, **body}


def _with_reasoning(item: dict, reasoning: str | None) -> dict:
    return item if reasoning is None else {**item, "reasoning_content": reasoning}


def _think_text(message: Message) -> str:
    """An assistant's text with its reasoning as a leading <think> block (alpaca, sharegpt)."""
    if message.reasoning is None:
        return message.content
    return f"<think>\n{message.reasoning}\n</think>\n\n{message.content}"


def _write_multi_turn(conv: Conversation) -> dict:
    turns: list[dict] = []
    messages = conv.messages
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.role == "tool":
            raise _cannot(
                "multi-turn",
                f"{_which(i, m)} does not follow a tool call; multi-turn writes a call and its result as one tool turn",
            )
        if not m.tool_calls:
            turns.append(
                _with_loss(_with_reasoning({"role": m.role, "content": m.content}, m.reasoning), m.loss)
            )
            i += 1
            continue
        result = messages[i + 1] if i + 1 < len(messages) else None
        call = _multi_turn_call(i, m, result)
        item = {
            "role": "tool",
            "name": call.name,
            "parameters": call.arguments,
            "observation": result.content,
        }
        turns.append(_with_loss(_with_reasoning(item, m.reasoning), m.loss))
        i += 2
    return _with_tools({"conversations": turns}, conv.tools)


def _multi_turn_call(index: int, message: Message, result: Message | None) -> ToolCall:
    """The one call of a multi-turn tool turn: one call, no text, followed by its result under the same name."""
    which = _which(index, message)
    if len(message.tool_calls) != 1:
        raise _cannot(
            "multi-turn", f"{which} has {len(message.tool_calls)} tool calls; a tool turn holds one"
        )
    if message.content:
        raise _cannot("multi-turn", f"{which} has text and a tool call; a multi-turn tool turn has no text")
    call = message.tool_calls[0]
    if result is None or result.role != "tool":
        raise _cannot("multi-turn", f"{which} is a tool call without its result; a tool turn holds both")
    if result.name != call.name:
        got = "has no name" if result.name is None else f"is named {result.name!r}"
        raise _cannot(
            "multi-turn",
            f"message {index + 2} (tool) answers the call to {call.name!r} in message {index + 1} but {got}; "
            "a multi-turn tool turn has one name for both",
        )
    return call


def _write_input_output(conv: Conversation) -> dict:
    roles = [m.role for m in conv.messages]
    if roles != ["user", "assistant"]:
        raise _cannot(
            "input-output",
            f"input-output holds one prompt and one response; got {len(roles)} messages ({', '.join(roles)})",
        )
    if conv.tools is not None:
        raise _cannot("input-output", "input-output has no tools")
    prompt, response = conv.messages
    if response.tool_calls:
        raise _cannot("input-output", "the response is a tool call; input-output has no tool calls")
    if response.reasoning is not None:
        raise _cannot("input-output", "the response has reasoning; input-output responses are raw text")
    return {"prompt": prompt.content, "response": response.content}


def _write_openai(conv: Conversation) -> dict:
    """OpenAI's shape: arguments as JSON strings, call ids, tool results named and linked by tool_call_id."""
    messages: list[dict] = []
    pending: list[tuple[str, str]] = []  # (call id, tool name) of the calls not answered yet
    count = 0
    for m in conv.messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                count += 1
                pending.append((f"call_{count}", call.name))
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                function = {"name": call.name, "arguments": arguments}
                calls.append({"id": f"call_{count}", "type": "function", "function": function})
            item = {"role": m.role, "content": m.content or None, "tool_calls": calls}
        if m.role == "tool" and m.name is not None:
            answered = next((p for p in pending if p[1] == m.name), None)
            link = {}
            if answered is not None:
                pending.remove(answered)
                link = {"tool_call_id": answered[0]}
            item = {"role": "tool", **link, "name": m.name, "content": m.content}
        messages.append(_with_loss(_with_reasoning(item, m.reasoning), m.loss))
    return _with_tools({"messages": messages}, conv.tools)


def _write_alpaca(conv: Conversation) -> dict:
    """{instruction, output, system?, history?}; the whole prompt goes into `instruction` (no `input`)."""
    if conv.tools is not None:
        raise _cannot("alpaca", "alpaca has no tools")
    for i, m in enumerate(conv.messages):
        if m.tool_calls or m.role == "tool":
            what = "has tool calls" if m.tool_calls else "is a tool result"
            raise _cannot("alpaca", f"{_which(i, m)} {what}; alpaca has no tool calls")
    messages = conv.messages
    record: dict[str, Any] = {}
    start = 0
    if messages and messages[0].role == "system":
        if not messages[0].content.strip():
            raise _cannot(
                "alpaca", "message 1 (system) is empty; alpaca has no place for an empty system message"
            )
        record["system"] = messages[0].content
        start = 1
    pairs = _alpaca_pairs(messages, start)
    record = {"instruction": pairs[-1][0], "output": pairs[-1][1], **record}
    if len(pairs) > 1:
        record["history"] = [list(pair) for pair in pairs[:-1]]
    return record


def _alpaca_pairs(messages: list[Message], start: int) -> list[tuple[str, str]]:
    pairs = []
    for i in range(start, len(messages), 2):
        question = messages[i]
        answer = messages[i + 1] if i + 1 < len(messages) else None
        if question.role != "user" or answer is None or answer.role != "assistant":
            raise _cannot(
                "alpaca",
                f"alpaca holds [question, answer] pairs: message {i + 1} must be a user message followed by an "
                f"assistant reply (roles: {', '.join(m.role for m in messages)})",
            )
        pairs.append((question.content, _think_text(answer)))
    if not pairs:
        raise _cannot("alpaca", "alpaca needs a user message and an assistant reply")
    return pairs


def _write_sharegpt(conv: Conversation) -> dict:
    """{conversations: [{from, value}], system?, tools? (a JSON string, as LLaMA-Factory has it)}."""
    turns: list[dict] = []
    system = None
    for i, m in enumerate(conv.messages):
        if m.role == "system" and i == 0 and m.content.strip():
            system = m.content
        elif m.role == "system":
            turns.append({"from": "system", "value": m.content})
        elif m.role == "user":
            turns.append({"from": "human", "value": m.content})
        elif m.role == "tool":
            if m.name is not None:
                raise _cannot(
                    "sharegpt", f"{_which(i, m)} is named {m.name!r}; sharegpt observations have no name"
                )
            turns.append({"from": "observation", "value": m.content})
        elif m.tool_calls:
            if m.content or m.reasoning is not None:
                raise _cannot(
                    "sharegpt",
                    f"{_which(i, m)} has {'text' if m.content else 'reasoning'} and tool calls; a function_call "
                    "turn has neither",
                )
            calls = [{"name": c.name, "arguments": c.arguments} for c in m.tool_calls]
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            turns.append({"from": "function_call", "value": value})
        else:
            turns.append({"from": "gpt", "value": _think_text(m)})
    record: dict[str, Any] = {"conversations": turns}
    if system is not None:
        record["system"] = system
    if conv.tools is not None:
        record["tools"] = json.dumps(conv.tools, ensure_ascii=False)
    return record


_WRITERS: dict[str, Callable[[Conversation], dict]] = {
    "multi-turn": _write_multi_turn,
    "input-output": _write_input_output,
    "openai": _write_openai,
    "alpaca": _write_alpaca,
    "sharegpt": _write_sharegpt,
}


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


# ---------------------------------------------------------------------------------------------------- format scripts


@dataclass
class Formatted:
    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    read: int = 0

    @property
    def invalid(self) -> int:
        return self.read - len(self.records)


def advertise_gen_record(raw: Any) -> dict:
    """An AdvertiseGen line {"content", "summary"} as an input-output record {"prompt", "response"}."""
    if isinstance(raw, dict):
        missing = next((key for key in ("content", "summary") if key not in raw), None)
        if missing:
            raise RecordError(missing, "missing")
        raw = {"content": raw["content"], "summary": raw["summary"]}
    return to_record(parse_record(raw, "input-output"), "input-output")


def format_advertise_gen(path: Path) -> Formatted:
    out = Formatted()
    for item in read_records(path):
        out.read += 1
        if isinstance(item, Problem):
            out.problems.append(item)
            continue
        line, raw = item
        try:
            out.records.append(advertise_gen_record(raw))
        except RecordError as e:
            out.problems.append(Problem(str(path), line, e.field, e.message))
    return out


def react_thought(log: str) -> str:
    """The thought of a ReAct log: the text before `Action:`, without a leading `Thought:` label. ToolAlpaca's logs
    prefix lines with the speaker (`ASSISTANT Thought: ...\\nASSISTANT Action: ...`): that label goes too."""
    thought = log.split("Action:", 1)[0]
    thought = re.sub(r"(?:^|\n)[ \t]*ASSISTANT[ \t]*$", "", thought)
    return re.sub(r"^\s*(?:ASSISTANT\s+)?Thought\s*:", "", thought).strip()


def _get(obj: dict, key: str, path: str, kind: type, what: str) -> Any:
    if key not in obj:
        raise RecordError(path, "missing")
    if not isinstance(obj[key], kind):
        raise RecordError(path, f"must be {what}, got {_json_type(obj[key])}")
    return obj[key]


def _text(obj: dict, key: str, path: str) -> str:
    text = _get(obj, key, path, str, "a string")
    if not text.strip():
        raise RecordError(path, "must not be empty")
    return text


def _shape(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else _json_type(value)


def _tool_alpaca_step(step: Any, path: str) -> list[Message]:
    """[[tool, tool_input (JSON string), react log], observation] -> the thought (if any), the call, its result."""
    if not isinstance(step, list) or len(step) != 2:
        raise RecordError(path, f"must be [[tool, tool_input, log], observation], got {_shape(step)}")
    if not isinstance(step[0], list) or len(step[0]) != 3:
        raise RecordError(f"{path}[0]", f"must be [tool, tool_input, log], got {_shape(step[0])}")
    (name, tool_input, log), observation = step
    for value, where in ((name, "[0][0]"), (tool_input, "[0][1]"), (log, "[0][2]"), (observation, "[1]")):
        if not isinstance(value, str):
            raise RecordError(path + where, f"must be a string, got {_json_type(value)}")
    if not name.strip():
        raise RecordError(f"{path}[0][0]", "must not be empty")
    try:
        parameters = json.loads(tool_input)
    except (ValueError, RecursionError) as e:
        raise RecordError(
            f"{path}[0][1]", f"tool input must be a JSON object string; {_json_error(e)}"
        ) from None
    if not isinstance(parameters, dict):
        raise RecordError(
            f"{path}[0][1]", f"tool input must be a JSON object string, got JSON {_json_type(parameters)}"
        )
    thought = react_thought(log)
    call = Message("assistant", "", tool_calls=[ToolCall(name, parameters)])
    said = [Message("assistant", thought)] if thought else []
    return [*said, call, Message("tool", observation, name=name)]


def tool_alpaca_conversation(instance: Any, documentation: str, path: str = "instance") -> Conversation:
    """One ToolAlpaca instance: tools [documentation], the question, per step the thought (left out when empty),
    the call and its observation, and a final assistant turn `Final Thought + "\\n" + output`."""
    if not isinstance(instance, dict):
        raise RecordError(path, f"must be an object, got {_json_type(instance)}")
    question = _text(instance, "input", f"{path}.input")
    answer = _text(instance, "output", f"{path}.output")
    final_thought = _get(instance, "Final Thought", f"{path}.Final Thought", str, "a string")
    steps = _get(instance, "intermediate_steps", f"{path}.intermediate_steps", list, "a list")
    messages = [Message("user", question)]
    for k, step in enumerate(steps):
        messages += _tool_alpaca_step(step, f"{path}.intermediate_steps[{k}]")
    final = f"{final_thought}\n{answer}" if final_thought.strip() else answer
    messages.append(Message("assistant", final))
    return Conversation(messages, tools=[documentation])


def tool_alpaca_entry(entry: Any) -> list[dict | RecordError]:
    """A multi-turn record, or the RecordError that left it out, per instance of one API entry. An entry whose
    instances cannot be listed (not an object, no Instances list) gives one RecordError."""
    if not isinstance(entry, dict):
        return [RecordError("(entry)", f"must be an object, got {_json_type(entry)}")]
    try:
        instances = _get(entry, "Instances", "Instances", list, "a list")
    except RecordError as e:
        return [e]
    try:
        documentation = _text(entry, "NLDocumentation", "NLDocumentation")
    except RecordError as e:
        return [e] * len(instances)
    results: list[dict | RecordError] = []
    for j, instance in enumerate(instances):
        try:
            conv = tool_alpaca_conversation(instance, documentation, f"Instances[{j}]")
            results.append(to_record(conv, "multi-turn"))
        except RecordError as e:
            results.append(e)
    return results


def format_tool_alpaca(path: Path) -> Formatted:
    """Every instance of every entry; `read` counts instances (an entry without an Instances list counts as one)."""
    out = Formatted()
    for item in read_records(path):
        if isinstance(item, Problem):
            out.problems.append(item)
            out.read += 1
            continue
        line, entry = item
        for result in tool_alpaca_entry(entry):
            out.read += 1
            if isinstance(result, RecordError):
                out.problems.append(Problem(str(path), line, result.field, result.message))
            else:
                out.records.append(result)
    return out


def _format_main(
    argv: list[str] | None, description: str, default_out: str, run: Callable[[Path], Formatted], unit: str
) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--path", required=True, help="the input file")
    p.add_argument(
        "--out",
        default=default_out,
        help="output JSON lines file (default: %(default)s, in the current directory)",
    )
    args = p.parse_args(argv)
    if not Path(args.path).is_file():
        return _usage_error(DataFileError(f"{args.path}: {_not_a_file(args.path)}"))
    try:
        out = run(Path(args.path))
        write_records(out.records, args.out)
    except OSError as e:
        return _usage_error(e)
    _print_problems(out.problems)
    print(f"read {out.read} {unit}, written {len(out.records)}, invalid {out.invalid}")
    print(f"wrote {args.out}")
    return EXIT_INVALID if out.invalid else EXIT_OK


def format_advertise_gen_main(argv: list[str] | None = None) -> int:
    return _format_main(
        argv,
        "Format AdvertiseGen (JSON lines of {content, summary}) as input-output JSON lines {prompt, response}. "
        "Bad lines are listed as FILE:LINE: field: problem and left out. "
        "Exit status: 0 all formatted, 1 some lines invalid (the rest still written), 2 usage error.",
        "formatted_data/advertise_gen.jsonl",
        format_advertise_gen,
        "records",
    )


def format_tool_alpaca_main(argv: list[str] | None = None) -> int:
    return _format_main(
        argv,
        "Format ToolAlpaca (a JSON array of API entries {Name, NLDocumentation, Instances}) as multi-turn JSON "
        "lines with tools: one conversation per instance (tools = [NLDocumentation]; the question; per step the "
        "thought before 'Action:' (its 'Thought:' label removed, left out when empty) and a tool turn with name, "
        "parameters and observation; then Final Thought + newline + output, or the output alone when Final "
        "Thought is empty). Instances that cannot be formatted are listed as FILE:ENTRY: field: why (ENTRY: the "
        "1-based element of the array; field e.g. Instances[1].intermediate_steps[0][0][1], 0-based) and left "
        "out. "
        "Exit status: 0 all formatted, 1 some instances invalid (the rest still written), 2 usage error.",
        "formatted_data/tool_alpaca.jsonl",
        format_tool_alpaca,
        "instances",
    )
