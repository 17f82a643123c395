"""Preference records: a shared conversation in any chatft format plus a chosen and a rejected reply, or KTO's
one reply with a boolean label. Every record is validated by the SFT reader of its format (the conversation and
each reply are read as that format's conversation ending with the reply), so the same rules and the same located
errors apply; a problem inside a reply is reported at the reply's own field (`chosen.content`, `rejected`).

Layouts (the conversation's format is detected from the record, as for SFT):
- openai:      {"messages": [... ending with a user or tool message], "chosen": {"role": "assistant", "content"},
               "rejected": {...}}; a reply may also be a list of that one message (TRL's conversational form)
- multi-turn:  {"conversations": [{"role", "content"}, ...], "chosen": {"role": "assistant", "content"}, ...}
- sharegpt:    {"conversations": [{"from": "human", "value"}, ...], "chosen": {"from": "gpt", "value"},
               "rejected": {...}, "system"?, "tools"?}  (LLaMA-Factory's preference layout)
- alpaca:      {"instruction", "input"?, "chosen": str, "rejected": str, "system"?, "history"?}  (LLaMA-Factory's)
- input-output: {"prompt", "chosen": str, "rejected": str}  (TRL's standard form; rendered raw, no chat markup)
A reply's reasoning is read as SFT reads an assistant turn's: `reasoning_content` (or `reasoning`) on a reply
message, or a leading <think>...</think> block in its text (alpaca's string replies too, as SFT reads alpaca's
`output`; input-output is raw text, where a block is text); two replies that differ only in their reasoning are a
pair.
KTO (unpaired): the SFT record of any format, whose last assistant turn is the reply, plus "label": true|false
(LLaMA-Factory's "kto_tag" is read too; input-output may name the reply "completion", as TRL does). For KTO a
paired record gives two examples: the chosen reply labelled true, the rejected one false.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from chatft.data.formats import (
    FORMAT_NAMES,
    LoadedData,
    detect_format,
    expand_paths,
    load_file,
    parse_record,
    read_records,
)
from chatft.data.schema import Conversation, Message, RecordError

REPLIES = ("chosen", "rejected")
LABEL_KEYS = ("label", "kto_tag")
_TURNS = {"openai": "messages", "multi-turn": "conversations", "sharegpt": "conversations"}
_ROLE_KEY = {
    "openai": ("role", "assistant"),
    "multi-turn": ("role", "assistant"),
    "sharegpt": ("from", "gpt"),
}
_TEXT_REPLY = {"alpaca": "output", "input-output": "response"}

UNDETECTED = (
    "cannot detect the format: expected chosen and rejected replies (or a KTO label) beside messages (openai), "
    "conversations (multi-turn, sharegpt), instruction (alpaca) or prompt (input-output)"
)


@dataclass
class PreferenceExample:
    """conversation: the shared prompt, ending with a user or tool turn; chosen: the preferred reply (KTO: the one
    reply); rejected: the other reply (None for KTO's unpaired records); label: KTO's desirable or not (None for
    pairs)."""

    conversation: Conversation
    chosen: Message
    rejected: Message | None = None
    label: bool | None = None

    @property
    def paired(self) -> bool:
        return self.rejected is not None


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list"}
    return names.get(type(value), "object" if isinstance(value, dict) else type(value).__name__)


def detect_preference_format(record: Any) -> str | None:
    """The conversation format of a preference (or KTO) record, detected as for SFT with a stand-in reply."""
    if not isinstance(record, dict):
        return None
    probe = {k: v for k, v in record.items() if k not in REPLIES}
    if "completion" in probe and "prompt" in probe:
        probe["response"] = probe.pop("completion")
    if "instruction" in probe:
        probe.setdefault("output", "")
    if "prompt" in probe:
        probe.setdefault("response", "")
    return detect_format(probe)


def parse_preference(record: Any, fmt: str) -> PreferenceExample:
    """One record as a PreferenceExample; RecordError(field, message) for its first problem."""
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_NAMES)}")
    if not isinstance(record, dict):
        raise RecordError("(record)", f"must be a JSON object, got {_type_name(record)}")
    label = _label(record)
    if any(k in record for k in REPLIES):
        for key in REPLIES:
            if key not in record:
                raise RecordError(key, "missing (a pair needs a chosen and a rejected reply)")
        conversation, chosen = _with_reply(record, fmt, "chosen")
        _, rejected = _with_reply(record, fmt, "rejected")
        if _same(chosen, rejected):
            raise RecordError(
                "rejected",
                "identical to chosen (surrounding white space aside): a pair must prefer one reply to a "
                "different one",
            )
        return PreferenceExample(conversation, chosen, rejected, label)
    if label is None:
        raise RecordError(
            "chosen",
            "missing: a preference record has chosen and rejected replies, or a KTO label (true/false)",
        )
    return _unpaired(record, fmt, label)


def _label(record: dict) -> bool | None:
    present = [k for k in LABEL_KEYS if k in record]
    if not present:
        return None
    if len(present) > 1:
        raise RecordError(present[1], "give the label once (as label or kto_tag), not both")
    value = record[present[0]]
    if not isinstance(value, bool):
        raise RecordError(present[0], f"must be a bool (true: a desirable reply), got {_type_name(value)}")
    return value


def _without(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _with_reply(record: dict, fmt: str, key: str) -> tuple[Conversation, Message]:
    """Read the record as the SFT record of its format whose conversation ends with this reply; problems inside
    the reply are reported at the reply's field."""
    body = _without(record, (*REPLIES, *LABEL_KEYS))
    value = record[key]
    if fmt in _TEXT_REPLY:
        if not isinstance(value, str):
            raise RecordError(key, f"must be a string, got {_type_name(value)}")
        target = _TEXT_REPLY[fmt]
        body[target] = value
        where = {target: key}
    else:
        turns_key = _TURNS[fmt]
        turns = body.get(turns_key)
        if not isinstance(turns, list):  # the reader says what is wrong with it
            parse_record(body, fmt)
        reply_path, item = _reply_item(value, key)
        role_key, role = _ROLE_KEY[fmt]
        given = item.get(role_key, role)
        if given != role and not (fmt == "sharegpt" and given in ("assistant", "function_call")):
            raise RecordError(f"{reply_path}.{role_key}", f"must be {role!r}, got {given!r}")
        _check_ends_on_user_side(turns, fmt, turns_key)
        body[turns_key] = [*turns, {role_key: role, **item}]
        where = {f"{turns_key}[{len(turns)}]": reply_path}
    try:
        conv = parse_record(body, fmt)
    except RecordError as e:
        raise _relocated(e, where) from None
    reply = conv.messages[-1]
    if reply.loss is False:
        raise RecordError(f"{key}.loss", "a preference reply is always trained: remove loss: false")
    return Conversation(conv.messages[:-1], tools=conv.tools, raw=conv.raw), replace(reply, loss=None)


def _reply_item(value: Any, key: str) -> tuple[str, dict]:
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(
                key, f"must be one message (or a list of exactly one), got a list of {len(value)}"
            )
        value, key = value[0], f"{key}[0]"
    if not isinstance(value, dict):
        raise RecordError(key, f"must be a message object, got {_type_name(value)}")
    return key, value


def _check_ends_on_user_side(turns: list, fmt: str, turns_key: str) -> None:
    last = turns[-1] if turns else None
    if not isinstance(last, dict):
        return  # empty or malformed: the reader reports it
    # an answering turn last (anything else, e.g. an unknown role, is the reader's to report)
    if fmt == "sharegpt":
        answers = last.get("from") in ("gpt", "assistant", "function_call", "system")
    else:
        answers = last.get("role") in ("assistant", "system")
    if answers:
        raise RecordError(
            turns_key, "must end with a user (or tool) turn: the chosen and rejected replies answer it"
        )


def _relocated(error: RecordError, where: dict[str, str]) -> RecordError:
    for old, new in where.items():
        if error.field == old or error.field.startswith((old + ".", old + "[")):
            return RecordError(new + error.field[len(old) :], error.message)
    return error


def _same(a: Message, b: Message) -> bool:
    return (
        a.content.strip() == b.content.strip()
        and a.tool_calls == b.tool_calls
        and (a.reasoning or "").strip() == (b.reasoning or "").strip()
    )


def _unpaired(record: dict, fmt: str, label: bool) -> PreferenceExample:
    body = _without(record, LABEL_KEYS)
    if fmt == "input-output" and "completion" in body and "response" not in body:
        body["response"] = body.pop("completion")
    conv = parse_record(body, fmt)
    reply = conv.messages[-1]
    where = _TURNS.get(fmt, "(record)")
    if reply.role != "assistant":
        raise RecordError(where, "must end with the assistant reply that the label judges")
    if reply.loss is False:
        raise RecordError(where, "its last turn has loss: false, but the labelled reply is always trained")
    context = Conversation(conv.messages[:-1], tools=conv.tools, raw=conv.raw)
    return PreferenceExample(context, replace(reply, loss=None), None, label)


def load_preferences(paths: list[str], fmt: str = "auto", log: Callable[[str], Any] = print) -> LoadedData:
    """Every record of every file as (file, line, PreferenceExample), or a located Problem."""
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise ValueError(f"format must be auto or one of {', '.join(FORMAT_NAMES)}; got {fmt!r}")
    loaded = LoadedData()
    for path in expand_paths(paths):
        load_file(
            str(path),
            list(read_records(path)),
            fmt,
            log,
            loaded,
            parse=parse_preference,
            detect=detect_preference_format,
            undetected=UNDETECTED,
        )
    return loaded
