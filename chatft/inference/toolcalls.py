"""Tool calls read back from an answer: the inverse of how training writes them (data.templates:
tool_call_text's `<tool_call>` JSON blocks, chatglm3_tool_call's `name` + python `tool_call(...)` block), so
that a call the model writes in its trained form comes back as an OpenAI `tool_calls` entry.
"""

from __future__ import annotations

import ast
import json
import re
import uuid

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
CHATGLM3_CALL = re.compile(r"^\s*([\w.\-]+)\s*\n```python\n(.*?)\n```\s*$", re.S)


def held_for_calls(template_name: str | None) -> tuple[list[str], bool]:
    """(markers, hold_all) for streaming.StreamText when tools are offered: the text a call opens with, held
    back until it is known to be none; or, for ChatGLM3, the whole answer, since its call starts with the
    tool's bare name and nothing tells it from text until its code block has come."""
    if template_name == "chatglm3":
        return [], True
    return [TOOL_CALL_OPEN], False


def parse_tool_calls(text: str, template_name: str | None) -> tuple[str, list[dict]]:
    """(content, tool_calls) of an answer: the calls written in the trained form come out as OpenAI tool calls;
    an answer whose calls do not all parse stays text (a half-parsed answer would hide what the model wrote)."""
    if template_name == "chatglm3":
        match = CHATGLM3_CALL.match(text)
        call = _chatglm3_call(match.group(1), match.group(2)) if match else None
        return ("", [call]) if call else (text.strip(), [])
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except ValueError:
            return text.strip(), []
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return text.strip(), []
        arguments = data.get("arguments", {})
        # OpenAI's arguments are a JSON string; a model may write them as an object or, already, as a string
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(_tool_call(data["name"], arguments))
    return TOOL_CALL.sub("", text).strip(), calls


def _chatglm3_call(name: str, code: str) -> dict | None:
    """The call of a `tool_call(key=literal, ...)` code block; None for any other code (never run, only
    parsed: the arguments must be literals)."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and not node.args):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError):
        return None
    return _tool_call(name, json.dumps(arguments, ensure_ascii=False))


def _tool_call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
