"""Data files -> records: the paths expanded (a directory to its data files), each file read as JSON lines or as
one JSON array, every line or element that is not UTF-8 or not JSON a located Problem instead of an exception. An
array with broken elements is read element by element, so only those elements are lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatft.data.schema import Problem

DATA_SUFFIXES = (".json", ".jsonl")

_BOM = b"\xef\xbb\xbf"


class DataFileError(ValueError):
    """A data path that cannot be used at all (missing, or a directory without data files)."""


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
