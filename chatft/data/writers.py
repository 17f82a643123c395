"""Writers, the inverse of the readers in readers.py: a Conversation as one record of a format.

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

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from chatft.data.readers import FORMAT_NAMES, parse_record
from chatft.data.schema import Conversation, Message, RecordError, ToolCall


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
