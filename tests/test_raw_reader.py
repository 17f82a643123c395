"""chatft.data.raw reads the files in a stream (JSON arrays a chunk at a time) and must find exactly what files.py
finds reading them whole: the same records with the same numbers, the same located problems."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
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


def _resident_kb(path: Path) -> int:
    """This process's resident kB of its mappings of the file at path (/proc/self/smaps)."""
    total, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux: /proc/self/smaps")
def test_released_pages_leave_the_rss_and_the_data_reads_the_same(tmp_path):
    """The raw table's pages read by the tokenizing map count in RSS while mapped: released, they leave it, and
    the memory-mapped table still reads the same (the pages fault back in from the page cache)."""
    texts = [f"{i:06d} " + "x" * 4000 for i in range(2000)]  # ~8 MB
    path = tmp_path / "raw.arrow"
    with datasets.arrow_writer.ArrowWriter(path=str(path)) as writer:
        writer.write_batch({"text": texts})
        writer.finalize()
    table = datasets.Dataset.from_file(str(path))
    assert table["text"][:] == texts
    assert _resident_kb(path) > 4000
    assert raw.release_mapped_pages(path) >= 1
    assert _resident_kb(path) < 200
    assert table["text"][:] == texts  # read again: the same
    assert _resident_kb(path) > 4000
    assert raw.release_mapped_pages() >= 1  # every *.arrow file
    assert _resident_kb(path) < 200
