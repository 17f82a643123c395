"""One reader per input format (formats.py's docstring lists them): a record, a JSON object, -> a Conversation, or
RecordError(field path, message) for its first problem. parse_record picks the reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from chatft.data.fields import (
    _EMPTY_TRAINED,
    _arguments,
    _assistant_text,
    _list,
    _loss,
    _nonempty,
    _object,
    _optional_string,
    _reasoning_field,
    _require,
    _require_user_and_assistant,
    _required_string,
    _role,
    _string,
    _trained_content,
    _type_name,
    split_think,
)
from chatft.data.files import _json_message
from chatft.data.schema import Conversation, Message, RecordError, ToolCall

FORMAT_NAMES = ("multi-turn", "input-output", "openai", "alpaca", "sharegpt")

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


def parse_record(record: Any, fmt: str) -> Conversation:
    """One record in format `fmt` as a Conversation; raises RecordError(field, message) for the first problem."""
    reader = _READERS.get(fmt)
    if reader is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_NAMES)}")
    if not isinstance(record, dict):
        raise RecordError("(record)", f"must be a JSON object, got {_type_name(record)}")
    return reader(record)


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
