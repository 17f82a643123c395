"""Loading the supported input formats: every record validated into a `Conversation`, every bad record
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

Reading the files is files.py, the field checks fields.py, one reader per format readers.py; this module detects
each file's format and loads its records. The names other modules take from here are re-exported (__all__).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatft.data.fields import THINK_CLOSE, THINK_OPEN, split_think
from chatft.data.files import DataFileError, expand_paths, read_records
from chatft.data.readers import FORMAT_NAMES, _openai_message, parse_record
from chatft.data.schema import Conversation, Problem, RecordError

__all__ = [
    "FORMAT_NAMES",
    "THINK_CLOSE",
    "THINK_OPEN",
    "DataFileError",
    "LoadedData",
    "_openai_message",
    "detect_format",
    "expand_paths",
    "load_conversations",
    "load_file",
    "parse_record",
    "read_records",
    "split_think",
]


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
