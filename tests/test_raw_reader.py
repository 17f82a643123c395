"""chatft.data.raw reads the files in a stream (JSON arrays a chunk at a time) and must find exactly what files.py
finds reading them whole: the same records with the same numbers, the same located problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.data import raw
from chatft.data.files import read_records
from chatft.data.schema import Problem

GOOD = {"instruction": "问题", "output": "回答，很长的回答" * 3}
ELEMENTS = [json.dumps({**GOOD, "n": i}, ensure_ascii=False) for i in range(12)]

CASES = {
    "array.json": ("[" + ",\n ".join(ELEMENTS) + "]\n").encode(),
    "bom_array.json": b"\xef\xbb\xbf  [" + ",".join(ELEMENTS).encode() + b"]",
    "empty_array.json": b"[ ]",
    "numbers.json": b"[1234567, 89, true, null, " + ELEMENTS[0].encode() + b"]",
    "broken_element.json": (
        "[" + ",".join(ELEMENTS[:5] + ['{"instruction": oops}'] + ELEMENTS[5:]) + "]"
    ).encode(),
    "bad_utf8.json": ("[" + ",".join(ELEMENTS[:3]) + ",").encode()
    + b'{"instruction": "\xff", "output": "x"},'
    + ",".join(ELEMENTS[3:]).encode()
    + b"]",
    "missing_comma.json": ("[" + ",".join(ELEMENTS[:4]) + " " + ",".join(ELEMENTS[4:]) + "]").encode(),
    "not_closed.json": ("[" + ",".join(ELEMENTS)).encode(),
    "trailing_comma.json": ("[" + ",".join(ELEMENTS) + ",]").encode(),
    "lines.jsonl": ("\n".join(ELEMENTS[:3]) + "\n\n{broken\n" + "\r\n".join(ELEMENTS[3:]) + "\n").encode(),
    "bad_utf8_lines.jsonl": ELEMENTS[0].encode() + b'\n{"a": "\xfe"}\n' + ELEMENTS[1].encode(),
    "bom_lines.json": b"\xef\xbb\xbf" + "\n".join(ELEMENTS).encode(),
}


def _whole(path: Path) -> list:
    """files.py's reading, as (number, value) or the Problem."""
    return [item if isinstance(item, Problem) else (item[0], item[1]) for item in read_records(path)]


def _streamed(path: Path) -> list:
    out = []
    for item in raw.items(path):
        if isinstance(item, Problem):
            out.append(item)
        else:
            number, text, _ = item
            try:
                out.append((number, json.loads(text)))
            except ValueError:  # JSON lines are parsed later: files.py's message, as the worker makes it
                out.append(("unparsed", number))
    return out


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_reading_finds_what_whole_reading_finds(tmp_path, monkeypatch, name, chunk):
    monkeypatch.setattr(raw, "_CHUNK", chunk)  # elements across chunk boundaries
    path = tmp_path / name
    path.write_bytes(CASES[name])
    whole, streamed = _whole(path), _streamed(path)
    assert any(isinstance(x, Problem) for x in whole) == (  # the case is what its name says
        name not in ("array.json", "bom_array.json", "empty_array.json", "numbers.json", "bom_lines.json")
    )
    if name.endswith(".jsonl") or name == "bom_lines.json":  # the JSON of a line is parsed by the worker
        whole = [("unparsed", x.line) if isinstance(x, Problem) and x.field == "(json)" else x for x in whole]
    assert streamed == whole
