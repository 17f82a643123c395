"""The field checks every reader of readers.py shares: each returns the value or raises RecordError(field path,
message), and the reasoning of an assistant's text (a leading <think> block, or reasoning_content) is told apart
from its answer here. The underscored names are this package's own (the readers'), not an API.
"""

from __future__ import annotations

import json
from typing import Any

from chatft.data.files import _json_message
from chatft.data.schema import ROLES, Message, RecordError

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
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_KEYS = ("reasoning_content", "reasoning")  # OpenAI-style message keys (DeepSeek's API, vLLM)


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
