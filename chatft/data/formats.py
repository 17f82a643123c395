"""Readers for the supported input formats: every record validated into a `Conversation`, every bad record
reported as a located `Problem` (file, line, field path, message) instead of an exception.

Formats (see `FORMAT_NAMES`):
- multi-turn (ChatGLM3): {"conversations": [{"role", "content", "loss"?} | {"role": "tool", "name", "parameters",
  "observation"}], "tools"?}
- input-output: {"prompt", "response"} or AdvertiseGen's {"content", "summary"}; rendered raw (no chat markup)
- openai (with XTuner's per-message loss): {"messages": [{"role", "content", "loss"?, "tool_calls"?}], "tools"?}
- alpaca: {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
- sharegpt: {"conversations": [{"from", "value"}], "system"?, "tools"?}

Reasoning traces (Message.reasoning): an assistant message's `reasoning_content` (alias `reasoning`) in openai and
multi-turn records, or a leading <think>...</think> block of an assistant's text in every chat format (openai and
multi-turn content, alpaca output and history answers, sharegpt gpt values). The newlines just inside the block
and just after it are not part of either text (reasoning templates write them). Reasoning on any other message, a
<think> block that is not closed, a </think> elsewhere in an answer (templates split the answer there) and
reasoning given twice are located errors. input-output records are raw text: a <think> block there is text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.data.schema import ROLES, Conversation, Message, Problem, RecordError, ToolCall

FORMAT_NAMES = ("multi-turn", "input-output", "openai", "alpaca", "sharegpt")
DATA_SUFFIXES = (".json", ".jsonl")

_BOM = b"\xef\xbb\xbf"
_EMPTY_TRAINED = "must not be empty on a trained assistant turn"
_JSON_TYPES = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    list: "list",
    dict: "object",
}
_SHAREGPT_FROM = {
    "human": "human",
    "user": "human",
    "gpt": "gpt",
    "assistant": "gpt",
    "function_call": "function_call",
    "observation": "observation",
    "system": "system",
}
_SHAREGPT_NAMES = "human, gpt, function_call, observation, system"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_KEYS = ("reasoning_content", "reasoning")  # OpenAI-style message keys (DeepSeek's API, vLLM)


class DataFileError(ValueError):
    """A data path that cannot be used at all (missing, or a directory without data files)."""


@dataclass
class LoadedData:
    records: list[tuple[str, int, Conversation]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    records_read: int = 0

    @property
    def invalid(self) -> int:
        """Records read that are not valid: len(problems), plus every record but one of a file skipped as
        undetectable (that file has one Problem for all of its records)."""
        return self.records_read - len(self.records)


# ---------------------------------------------------------------------------------------------------- files


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given; a directory becomes its *.json / *.jsonl files (sorted, not recursive)."""
    if not paths:
        raise DataFileError("no data files given")
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise DataFileError(f"{name}: no .json or .jsonl files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataFileError(f"{name}: no such file or directory")
    return files


def read_records(path: Path) -> Iterator[tuple[int, Any] | Problem]:
    """(line, value) for each record, or a Problem for a line that is not UTF-8 / not JSON.

    `.jsonl`, and `.json` not starting with `[`: JSON lines (blank lines skipped); otherwise one JSON array whose
    records are numbered by element (1-based)."""
    data = path.read_bytes()
    data = data.removeprefix(_BOM)
    if path.suffix != ".jsonl" and data.lstrip()[:1] == b"[":
        yield from _read_json_array(str(path), data)
    else:
        yield from _read_json_lines(str(path), data)


def _read_json_lines(name: str, data: bytes) -> Iterator[tuple[int, Any] | Problem]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _utf8_problem(name, number, raw, e.start)
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except (ValueError, RecursionError) as e:
            yield Problem(name, number, "(json)", _json_message(e))


def _read_json_array(name: str, data: bytes) -> Iterator[tuple[int, Any] | Problem]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # read element by element: only the elements holding the bad bytes are lost
        yield from _scan_json_array(name, data.decode("utf-8", "surrogateescape"))
        return
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):  # located element by element: only the broken ones are lost
        yield from _scan_json_array(name, text)
        return
    yield from enumerate(values, start=1)


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape decodes it


def _scan_json_array(name: str, text: str) -> Iterator[tuple[int, Any] | Problem]:
    """The elements of a JSON array one at a time: each broken element is a Problem (numbered by element, its
    line in the file in the message) and the reading goes on after it, at the next top-level comma."""
    decoder = json.JSONDecoder()
    pos, n = text.index("[") + 1, 0
    while True:
        pos = _skip_space(text, pos)
        if pos >= len(text):
            yield Problem(
                name, n + 1, "(json)", f"invalid JSON: the array is not closed ({_where(text, pos)})"
            )
            return
        if text[pos] == "]" and n == 0:
            return
        n += 1
        start = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            at = e.pos if isinstance(e, json.JSONDecodeError) else start
            message = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            yield Problem(name, n, "(json)", f"invalid JSON: {message} ({_where(text, at)})")
            pos = _resync(decoder, text, max(at, start))
            if pos >= len(text):  # nothing readable after it: reported once, as this element
                return
        else:
            bad = _BAD_BYTE.search(text, start, pos)
            if bad:
                byte = ord(bad.group()) - 0xDC00
                yield Problem(
                    name, n, "(utf-8)", f"invalid UTF-8 byte 0x{byte:02x} ({_where(text, bad.start())})"
                )
            else:
                yield n, value
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text):  # two elements with no comma between them: the next one is reported as broken
            pos = _element_end(text, pos)
            n += 1
            yield Problem(
                name, n, "(json)", f"invalid JSON: expected ',' or ']' before it ({_where(text, pos)})"
            )
            if pos < len(text) and text[pos] == ",":
                pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _resync(decoder: json.JSONDecoder, text: str, after: int) -> int:
    """Where the next element begins after a broken one: the first comma after the error that is followed by a
    whole JSON value and then a comma or the closing bracket (or the end of the text, when there is none)."""
    comma = text.find(",", after)
    while comma != -1:
        try:
            _, end = decoder.raw_decode(text, _skip_space(text, comma + 1))
        except (ValueError, RecursionError):
            pass
        else:
            following = _skip_space(text, end)
            if following < len(text) and text[following] in ",]":
                return comma
        comma = text.find(",", comma + 1)
    return len(text)


def _element_end(text: str, start: int) -> int:
    """The index of the comma or bracket that ends the element starting at start (outside strings, at its own
    nesting depth), or the end of the text."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                return i
            depth -= 1
        elif c == "," and depth == 0:
            return i
    return len(text)


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line} column {column} of the file"


def _utf8_problem(name: str, line: int, raw: bytes, offset: int) -> Problem:
    return Problem(
        name, line, "(utf-8)", f"invalid UTF-8 byte 0x{raw[offset]:02x} at byte {offset + 1} of the line"
    )


def _json_message(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON: {error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {error}"


# ---------------------------------------------------------------------------------------------------- loading


def load_conversations(paths: list[str], fmt: str = "auto", log: Callable[[str], Any] = print) -> LoadedData:
    """Read and validate every record of every file; bad records become `problems`, never exceptions."""
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise ValueError(f"format must be auto or one of {', '.join(FORMAT_NAMES)}; got {fmt!r}")
    loaded = LoadedData()
    for path in expand_paths(paths):
        load_file(str(path), list(read_records(path)), fmt, log, loaded)
    return loaded


def load_file(
    name: str,
    items: list[tuple[int, Any] | Problem],
    fmt: str,
    log: Callable,
    loaded: LoadedData,
    *,
    parse: Callable[[Any, str], Any] | None = None,
    detect: Callable[[Any], str | None] | None = None,
    undetected: str | None = None,
) -> None:
    """Add one file's records (as read_records gives them) to `loaded`, with the format given or detected.

    parse(record, fmt) (default parse_record) makes each record what `loaded.records` holds, raising RecordError;
    detect and undetected are the format detection and its message (chatft.preference reads its records so)."""
    loaded.records_read += len(items)
    if not items:
        raise DataFileError(f"{name}: no records in this file (empty, blank lines only, or [])")
    first = next(
        (item for item in items if not isinstance(item, Problem) and isinstance(item[1], dict)), None
    )
    used = fmt if fmt != "auto" else ((detect or detect_format)(first[1]) if first else None)
    if used is None and first is not None:
        log(f"{name}: format unknown, file skipped")
        loaded.problems.append(Problem(name, first[0], "(format)", undetected or _UNDETECTED))
        return
    if used is None:  # no record is a JSON object: every reader reports each one the same way
        log(f"{name}: no JSON object records")
        used = FORMAT_NAMES[0]
    else:
        loaded.formats[name] = used
        log(f"{name}: format {used} ({'detected' if fmt == 'auto' else 'given'})")
    _parse_all(name, items, used, loaded, parse or parse_record)


_UNDETECTED = (
    "cannot detect the format: expected messages (openai), conversations (multi-turn, sharegpt), "
    "instruction+output (alpaca), prompt+response or content+summary (input-output)"
)


def _parse_all(
    name: str, items: list[tuple[int, Any] | Problem], fmt: str, loaded: LoadedData, parse: Callable
) -> None:
    """Each record becomes a (file, line, Conversation) or a Problem, in file order."""
    for item in items:
        if isinstance(item, Problem):
            loaded.problems.append(item)
            continue
        line, record = item
        try:
            loaded.records.append((name, line, parse(record, fmt)))
        except RecordError as e:
            loaded.problems.append(Problem(name, line, e.field, e.message))


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "openai"
    turns = record.get("conversations")
    first = next((t for t in turns if isinstance(t, dict)), None) if isinstance(turns, list) else None
    if first is not None and ("from" in first or "value" in first):
        return "sharegpt"
    if first is not None and "role" in first:
        return "multi-turn"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if ("prompt" in record and "response" in record) or ("content" in record and "summary" in record):
        return "input-output"
    return None


def parse_record(record: Any, fmt: str) -> Conversation:
    """One record in format `fmt` as a Conversation; raises RecordError(field, message) for the first problem."""
    reader = _READERS.get(fmt)
    if reader is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_NAMES)}")
    if not isinstance(record, dict):
        raise RecordError("(record)", f"must be a JSON object, got {_type_name(record)}")
    return reader(record)


# ---------------------------------------------------------------------------------------------------- field checks


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _require(obj: dict, key: str, path: str) -> Any:
    if key not in obj:
        raise RecordError(path, "missing")
    return obj[key]


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise RecordError(path, f"must be a string, got {_type_name(value)}")
    return value


def _nonempty(text: str, path: str, message: str = "must not be empty") -> str:
    if not text.strip():
        raise RecordError(path, message)
    return text


def _required_string(obj: dict, key: str, path: str) -> str:
    return _string(_require(obj, key, path), path)


def _optional_string(obj: dict, key: str, path: str) -> str:
    value = obj.get(key)
    return "" if value is None else _string(value, path)


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError(path, f"must be an object, got {_type_name(value)}")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise RecordError(path, f"must be a list, got {_type_name(value)}")
    return value


def _role(item: dict, path: str) -> str:
    role = _required_string(item, "role", f"{path}.role")
    if role not in ROLES:
        raise RecordError(f"{path}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
    return role


def _loss(item: dict, path: str, trainable: bool) -> bool | None:
    if "loss" not in item:
        return None
    loss = item["loss"]
    if not isinstance(loss, bool):
        raise RecordError(f"{path}.loss", f"must be a bool, got {_type_name(loss)}")
    if loss and not trainable:
        raise RecordError(f"{path}.loss", "loss: true is only allowed on assistant turns")
    return loss


def _arguments(value: Any, path: str) -> dict:
    """Tool-call arguments: an object, or a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise RecordError(path, f"must be a JSON object string; {_json_message(e)}") from None
        if not isinstance(value, dict):
            raise RecordError(path, f"must be a JSON object string, got JSON {_type_name(value)}")
        return value
    if not isinstance(value, dict):
        raise RecordError(path, f"must be an object or a JSON object string, got {_type_name(value)}")
    return value


def _require_user_and_assistant(messages: list[Message], path: str) -> None:
    roles = {m.role for m in messages}
    if "user" not in roles:
        raise RecordError(path, "needs at least one user message")
    if "assistant" not in roles:
        raise RecordError(path, "needs at least one assistant message")


def _trained_content(content: str, loss: bool | None, path: str) -> str:
    return content if loss is False else _nonempty(content, path, _EMPTY_TRAINED)


def split_think(text: str, path: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant's text: a leading <think>...</think> block (white space before it
    allowed) is the reasoning, without the newlines just inside it, and the answer is what follows, without the
    newlines just after it (Qwen3's template reads a <think> block so); no block: (None, text)."""
    stripped = text.lstrip()
    reasoning, answer = None, text
    if stripped.startswith(THINK_OPEN):
        end = stripped.find(THINK_CLOSE)
        if end == -1:
            raise RecordError(path, f"opens a {THINK_OPEN} block that is not closed by {THINK_CLOSE}")
        reasoning = stripped[len(THINK_OPEN) : end].strip("\n")
        answer = stripped[end + len(THINK_CLOSE) :].lstrip("\n")
    if THINK_CLOSE in answer:
        raise RecordError(
            path,
            f"holds {THINK_CLOSE} outside a leading {THINK_OPEN}...{THINK_CLOSE} block (reasoning templates split "
            "an answer there): put the reasoning first, or in reasoning_content",
        )
    return reasoning, answer


def _reasoning_field(item: dict, path: str, allowed: bool) -> str | None:
    """reasoning_content (or its alias reasoning) of a message; allowed only on an assistant's turn."""
    given = [key for key in REASONING_KEYS if item.get(key) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise RecordError(f"{path}.{given[1]}", f"give {given[0]} or its alias {given[1]}, not both")
    where = f"{path}.{given[0]}"
    if not allowed:
        raise RecordError(where, "only allowed on assistant messages")
    text = _string(item[given[0]], where)
    if THINK_CLOSE in text:
        raise RecordError(where, f"must not hold {THINK_CLOSE} (the template closes the reasoning with it)")
    return text


def _assistant_text(content: str, reasoning: str | None, path: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant's content, its reasoning field (None when absent) taken into account."""
    block, answer = split_think(content, path)
    if block is not None and reasoning is not None:
        raise RecordError(
            path, f"holds a {THINK_OPEN} block and the message has reasoning_content too: give it once"
        )
    return (reasoning if block is None else block), answer


# ---------------------------------------------------------------------------------------------------- multi-turn


def _read_multi_turn(record: dict) -> Conversation:
    items = _list(_require(record, "conversations", "conversations"), "conversations")
    messages: list[Message] = []
    for i, raw in enumerate(items):
        path = f"conversations[{i}]"
        item = _object(raw, path)
        role = _role(item, path)
        if role == "system":
            _check_multi_turn_system(messages, f"{path}.role")
        messages.extend(_multi_turn_message(item, role, path))
    _require_user_and_assistant(messages, "conversations")
    return Conversation(messages, tools=record.get("tools"))


def _check_multi_turn_system(messages: list[Message], path: str) -> None:
    if any(m.role == "user" for m in messages):
        raise RecordError(path, "system message must come before the first user message")
    if any(m.role == "system" for m in messages):
        raise RecordError(path, "only one system message is allowed")


def _multi_turn_message(item: dict, role: str, path: str) -> list[Message]:
    loss = _loss(item, path, trainable=role in ("assistant", "tool"))
    reasoning = _reasoning_field(item, path, allowed=role in ("assistant", "tool"))
    if role == "tool":
        return _multi_turn_tool(item, loss, reasoning, path)
    content = _required_string(item, "content", f"{path}.content")
    if role == "assistant":
        reasoning, content = _assistant_text(content, reasoning, f"{path}.content")
        _trained_content(content, loss, f"{path}.content")
    return [Message(role, content, loss=loss, reasoning=reasoning)]


def _multi_turn_tool(item: dict, loss: bool | None, reasoning: str | None, path: str) -> list[Message]:
    """A ChatGLM3 tool turn: the assistant's call (trained like an assistant turn) and the observation."""
    name = _nonempty(_required_string(item, "name", f"{path}.name"), f"{path}.name")
    parameters = _object(_require(item, "parameters", f"{path}.parameters"), f"{path}.parameters")
    observation = _require(item, "observation", f"{path}.observation")
    if not isinstance(observation, str):
        observation = json.dumps(observation, ensure_ascii=False)
    call = Message("assistant", "", loss=loss, tool_calls=[ToolCall(name, parameters)], reasoning=reasoning)
    return [call, Message("tool", observation, name=name)]


# ---------------------------------------------------------------------------------------------------- input-output


def _read_input_output(record: dict) -> Conversation:
    advertise_gen = "prompt" not in record and ("content" in record or "summary" in record)
    prompt_key, response_key = ("content", "summary") if advertise_gen else ("prompt", "response")
    prompt = _nonempty(_required_string(record, prompt_key, prompt_key), prompt_key)
    response = _nonempty(_required_string(record, response_key, response_key), response_key, _EMPTY_TRAINED)
    return Conversation([Message("user", prompt), Message("assistant", response)], raw=True)


# ---------------------------------------------------------------------------------------------------- openai


def _read_openai(record: dict) -> Conversation:
    items = _list(_require(record, "messages", "messages"), "messages")
    tools = record.get("tools")
    if tools is not None:
        _list(tools, "tools")
    call_names: dict[str, str] = {}
    messages = [_openai_message(raw, i, call_names) for i, raw in enumerate(items)]
    _require_user_and_assistant(messages, "messages")
    return Conversation(messages, tools=tools)


def _openai_message(raw: Any, index: int, call_names: dict[str, str]) -> Message:
    path = f"messages[{index}]"
    item = _object(raw, path)
    role = _role(item, path)
    if role == "system" and index != 0:
        raise RecordError(f"{path}.role", "system message must be the first message")
    loss = _loss(item, path, trainable=role == "assistant")
    reasoning = _reasoning_field(item, path, allowed=role == "assistant")
    if role == "assistant":
        return _openai_assistant(item, loss, reasoning, path, call_names)
    if item.get("tool_calls"):
        raise RecordError(f"{path}.tool_calls", "only allowed on assistant messages")
    content = _required_string(item, "content", f"{path}.content")
    name = _openai_tool_name(item, path, call_names) if role == "tool" else None
    return Message(role, content, loss=loss, name=name)


def _openai_assistant(
    item: dict, loss: bool | None, reasoning: str | None, path: str, call_names: dict[str, str]
) -> Message:
    calls = _openai_tool_calls(item.get("tool_calls"), f"{path}.tool_calls", call_names)
    if calls and item.get("content") is None:
        return Message("assistant", "", loss=loss, tool_calls=calls, reasoning=reasoning)
    content = _required_string(item, "content", f"{path}.content")
    reasoning, content = _assistant_text(content, reasoning, f"{path}.content")
    if not calls:
        _trained_content(content, loss, f"{path}.content")
    return Message("assistant", content, loss=loss, tool_calls=calls, reasoning=reasoning)


def _openai_tool_calls(value: Any, path: str, call_names: dict[str, str]) -> list[ToolCall]:
    if value is None:
        return []
    calls = []
    for i, raw in enumerate(_list(value, path)):
        call = _object(raw, f"{path}[{i}]")
        kind = call.get("type", "function")
        if kind != "function":
            raise RecordError(f"{path}[{i}].type", f"must be 'function', got {kind!r}")
        function = _object(_require(call, "function", f"{path}[{i}].function"), f"{path}[{i}].function")
        calls.append(_tool_call(function, f"{path}[{i}].function"))
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = calls[-1].name
    return calls


def _tool_call(call: dict, path: str) -> ToolCall:
    """{"name": str, "arguments": object or JSON string of one} (OpenAI function, ShareGPT function_call)."""
    name = _nonempty(_required_string(call, "name", f"{path}.name"), f"{path}.name")
    arguments = _arguments(_require(call, "arguments", f"{path}.arguments"), f"{path}.arguments")
    return ToolCall(name, arguments)


def _openai_tool_name(item: dict, path: str, call_names: dict[str, str]) -> str | None:
    if item.get("name") is not None:
        return _nonempty(_string(item["name"], f"{path}.name"), f"{path}.name")
    call_id = item.get("tool_call_id")
    return call_names.get(call_id) if isinstance(call_id, str) else None


# ---------------------------------------------------------------------------------------------------- alpaca


def _read_alpaca(record: dict) -> Conversation:
    instruction = _nonempty(_required_string(record, "instruction", "instruction"), "instruction")
    extra_input = _optional_string(record, "input", "input")
    reasoning, output = split_think(_required_string(record, "output", "output"), "output")
    _nonempty(output, "output", _EMPTY_TRAINED)
    system = _optional_string(record, "system", "system")
    messages = [Message("system", system)] if system.strip() else []
    for question, answer in _alpaca_history(record.get("history")):
        messages += [Message("user", question), answer]
    prompt = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    messages += [Message("user", prompt), Message("assistant", output, reasoning=reasoning)]
    return Conversation(messages)


def _alpaca_history(value: Any) -> list[tuple[str, Message]]:
    if value is None:
        return []
    pairs = []
    for i, pair in enumerate(_list(value, "history")):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"list of {len(pair)}" if isinstance(pair, list) else _type_name(pair)
            raise RecordError(f"history[{i}]", f"must be a [question, answer] pair, got {got}")
        question = _string(pair[0], f"history[{i}][0]")
        reasoning, answer = split_think(_string(pair[1], f"history[{i}][1]"), f"history[{i}][1]")
        _nonempty(answer, f"history[{i}][1]", _EMPTY_TRAINED)
        pairs.append((question, Message("assistant", answer, reasoning=reasoning)))
    return pairs


# ---------------------------------------------------------------------------------------------------- sharegpt


def _read_sharegpt(record: dict) -> Conversation:
    turns = _list(_require(record, "conversations", "conversations"), "conversations")
    system = _optional_string(record, "system", "system")
    tools = _sharegpt_tools(record.get("tools"))
    messages = [Message("system", system)] if system.strip() else []
    start, previous = 0, ""
    for i, raw in enumerate(turns):
        path = f"conversations[{i}]"
        turn = _object(raw, path)
        kind = _sharegpt_from(turn, path)
        value = _required_string(turn, "value", f"{path}.value")
        if kind == "system":
            _check_sharegpt_system(i, bool(system.strip()), f"{path}.from")
            messages.append(Message("system", value))
            start = 1
            continue
        _check_sharegpt_order(kind, i - start, previous, turn["from"], f"{path}.from")
        messages.append(_sharegpt_message(kind, value, f"{path}.value"))
        previous = kind
    if previous not in ("gpt", "function_call"):
        raise RecordError("conversations", "must end with a gpt or function_call turn")
    return Conversation(messages, tools=tools)


def _sharegpt_from(turn: dict, path: str) -> str:
    source = _required_string(turn, "from", f"{path}.from")
    if source not in _SHAREGPT_FROM:
        raise RecordError(f"{path}.from", f"must be one of {_SHAREGPT_NAMES}; got {source!r}")
    return _SHAREGPT_FROM[source]


def _check_sharegpt_system(index: int, has_top_level: bool, path: str) -> None:
    if index != 0:
        raise RecordError(path, "a system turn is only allowed first")
    if has_top_level:
        raise RecordError(path, "a system turn cannot be combined with a top-level system")


def _check_sharegpt_order(kind: str, position: int, previous: str, source: str, path: str) -> None:
    """Turns alternate: human/observation at even positions (1st, 3rd, ...), gpt/function_call at odd ones."""
    if position % 2 == 0 and kind not in ("human", "observation"):
        raise RecordError(path, f"expected human or observation here (turns alternate), got {source!r}")
    if position % 2 == 1 and kind not in ("gpt", "function_call"):
        raise RecordError(path, f"expected gpt or function_call here (turns alternate), got {source!r}")
    if kind == "observation" and previous != "function_call":
        raise RecordError(path, "observation must follow a function_call turn")


def _sharegpt_message(kind: str, value: str, path: str) -> Message:
    if kind == "human":
        return Message("user", value)
    if kind == "observation":
        return Message("tool", value)
    if kind == "gpt":
        reasoning, answer = split_think(value, path)
        return Message("assistant", _nonempty(answer, path, _EMPTY_TRAINED), reasoning=reasoning)
    return Message("assistant", "", tool_calls=_sharegpt_calls(value, path))


def _sharegpt_calls(value: str, path: str) -> list[ToolCall]:
    """A function_call value: a JSON string of {"name", "arguments"} or of a list of them."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise RecordError(path, f"must be a JSON string of a function call; {_json_message(e)}") from None
    if isinstance(parsed, dict):
        return [_tool_call(parsed, path)]
    if not isinstance(parsed, list) or not parsed:
        got = "an empty list" if parsed == [] else f"JSON {_type_name(parsed)}"
        raise RecordError(path, f'must be a JSON {{"name", "arguments"}} object or a list of them, got {got}')
    return [_tool_call(_object(call, f"{path}[{i}]"), f"{path}[{i}]") for i, call in enumerate(parsed)]


def _sharegpt_tools(value: Any) -> Any:
    """`tools`: a list, or a JSON string of one (an empty string means none)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise RecordError("tools", _json_message(e)) from None
    if not isinstance(value, list):
        raise RecordError("tools", f"must be a list or a JSON string of one, got {_type_name(value)}")
    return value


_READERS: dict[str, Callable[[dict], Conversation]] = {
    "multi-turn": _read_multi_turn,
    "input-output": _read_input_output,
    "openai": _read_openai,
    "alpaca": _read_alpaca,
    "sharegpt": _read_sharegpt,
}
