"""Data files -> an on-disk Arrow table of raw records, read in a stream: memory does not grow with the data.

Each row is one record as its file holds it: `file`, `record` (its line in a JSON-lines file, its 1-based element
in a JSON array), `text` (the record's JSON source) and, for a line or element that could not be read (not UTF-8,
not JSON), `field` and `error` (the located problem; `text` empty). JSON lines are only split and decoded here:
the JSON is parsed where the records are validated and tokenized (dataset.py, in the worker processes). A JSON
array is read in chunks, element by element (json raw_decode); an array that holds a broken element is read again
whole by files.py, which locates every broken element (files.py: only those are lost).

Each file's format is detected (or given) from its first JSON object before its rows are written; a file whose
format cannot be detected writes no rows and gives one Problem (its records counted as read, none valid), as
formats.load_file does for records held in memory.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import datasets
from tqdm.auto import tqdm

from chatft.data.files import _BAD_BYTE, _BOM, DataFileError, _scan_json_array, _utf8_problem, expand_paths
from chatft.data.formats import _UNDETECTED, FORMAT_NAMES, detect_format
from chatft.data.schema import Problem

RAW_FEATURES = datasets.Features(
    {
        "file": datasets.Value("string"),
        "record": datasets.Value("int64"),
        "text": datasets.Value("string"),
        "field": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)

_CHUNK = 1 << 22  # characters of a JSON array read at a time
_ROWS_PER_WRITE = 10_000


@dataclass
class RawData:
    """The raw table (memory-mapped) and what reading found: the formats detected or given per file (formats),
    the reader each file's records go to (parse_as: also a file with no JSON object), records read, the problems
    of files skipped as a whole (rows hold every other problem)."""

    dataset: datasets.Dataset
    formats: dict[str, str] = field(default_factory=dict)
    parse_as: dict[str, str] = field(default_factory=dict)
    records_read: int = 0
    problems: list[Problem] = field(default_factory=list)


# an item: (record, JSON text, parsed value or None when not parsed yet) or a Problem
Item = tuple[int, str, Any] | Problem


def read_raw(paths: list[str], fmt: str, folder: Path, log: Callable[[str], Any]) -> RawData:
    """Every record of every file into folder/raw.arrow; the formats detected logged as load_file logs them."""
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise ValueError(f"format must be auto or one of {', '.join(FORMAT_NAMES)}; got {fmt!r}")
    files = expand_paths(paths)
    out = RawData(datasets.Dataset.from_dict({}))
    path = folder / "raw.arrow"
    total = sum(p.stat().st_size for p in files)
    with (
        datasets.arrow_writer.ArrowWriter(features=RAW_FEATURES, path=str(path)) as writer,
        tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=_bars_off()) as bar,
    ):
        for file in files:
            used = file_format(file, fmt, log, out)
            if used is not None:
                out.parse_as[str(file)] = used
            rows: dict[str, list] = {k: [] for k in RAW_FEATURES}
            for item in items(file, bar):
                out.records_read += 1
                if used is None:
                    continue
                if isinstance(item, Problem):
                    _add(rows, str(file), item.line, "", item.field, item.message)
                else:
                    _add(rows, str(file), item[0], item[1], "", "")
                if len(rows["file"]) >= _ROWS_PER_WRITE:
                    writer.write_batch(rows)
                    rows = {k: [] for k in RAW_FEATURES}
            if rows["file"]:
                writer.write_batch(rows)
        writer.finalize()
    out.dataset = datasets.Dataset.from_file(str(path))
    return out


def release_mapped_pages(path: str | Path | None = None) -> int:
    """Takes this process's pages of the file at path (None: of every Arrow file, *.arrow) out of its resident
    memory: madvise MADV_DONTNEED on each read-only mapping of it. A memory-mapped file's pages that a process
    has read count in its RSS until they are unmapped, so one pass over the raw table grew the RSS of the
    tokenizing processes by the table's size, and an epoch over a cached dataset grows the trainer's by the
    dataset's; released, the pages stay in the page cache and a later read faults them back in. The mapping,
    and every Arrow buffer in it, stays valid. Linux only (elsewhere nothing); returns the mappings released."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read().splitlines()
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    target, released = None if path is None else str(Path(path).resolve()), 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1]:
            continue
        name = fields[5]
        if name != target and not (target is None and name.endswith(".arrow")):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        madvise_dontneed = 4
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madvise_dontneed) == 0:
            released += 1
    return released


def release_dataset_pages(dataset: datasets.Dataset) -> None:
    """release_mapped_pages for every Arrow file the dataset is memory-mapped from."""
    for cache_file in dataset.cache_files:
        release_mapped_pages(cache_file["filename"])


def _bars_off() -> bool:
    return not datasets.is_progress_bar_enabled()


def _add(rows: dict[str, list], file: str, record: int, text: str, field_: str, error: str) -> None:
    rows["file"].append(file)
    rows["record"].append(record)
    rows["text"].append(text)
    rows["field"].append(field_)
    rows["error"].append(error)


def file_format(file: str | Path, fmt: str, log: Callable[[str], Any], out: RawData) -> str | None:
    """The format used for this file (None: skipped, its Problem added), logged as formats.load_file logs it."""
    name = str(file)
    first: tuple[int, Any] | None = None
    seen = False
    for item in items(file, None):
        seen = True
        if isinstance(item, Problem):
            continue
        value = item[2] if item[2] is not None else _loads(item[1])
        if isinstance(value, dict):
            first = (item[0], value)
            break
    if not seen:
        raise DataFileError(f"{name}: no records in this file (empty, blank lines only, or [])")
    used = fmt if fmt != "auto" else (detect_format(first[1]) if first else None)
    if used is None and first is not None:
        log(f"{name}: format unknown, file skipped")
        out.problems.append(Problem(name, first[0], "(format)", _UNDETECTED))
        return None
    if used is None:  # no record is a JSON object: every reader reports each one the same way
        log(f"{name}: no JSON object records")
        return FORMAT_NAMES[0]
    out.formats[name] = used
    log(f"{name}: format {used} ({'detected' if fmt == 'auto' else 'given'})")
    return used


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _open(name: str | Path) -> BinaryIO:
    """A local file, or an fsspec URL (s3://, gs://, hf://, https://: whatever fsspec is configured for)."""
    name = str(name)
    if "://" not in name:
        return open(name, "rb")
    import fsspec

    return fsspec.open(name, "rb").open()


def items(name: str | Path, bar: tqdm | None = None) -> Iterator[Item]:
    """Each line or element of a local file or URL, in file order (numbered as files.read_records numbers them);
    bar counts bytes."""
    with _open(name) as f:
        head = f.read(4096)
    start = len(_BOM) if head.startswith(_BOM) else 0
    if not str(name).endswith(".jsonl") and head[start:].lstrip()[:1] == b"[":
        yield from _array_items(name, start, bar)
    else:
        yield from _line_items(name, bar)


def _line_items(name: str | Path, bar: tqdm | None) -> Iterator[Item]:
    with _open(name) as f:
        for number, raw in enumerate(f, start=1):
            if bar is not None:
                bar.update(len(raw))
            if number == 1:
                raw = raw.removeprefix(_BOM)
            raw = raw.rstrip(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _utf8_problem(str(name), number, raw, e.start)
                continue
            if text.strip():
                yield number, text, None


def _array_items(file: str | Path, start: int, bar: tqdm | None) -> Iterator[Item]:
    """The elements of a JSON array, read a chunk at a time. Bad UTF-8 bytes are decoded as surrogates (and the
    element holding one is a Problem, as files.py reports it); at the first element that does not parse, the rest
    is read as files.py reads a broken array, from the whole file."""
    decoder = json.JSONDecoder()
    with io.TextIOWrapper(_open(file), encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.read(start and 1)  # the BOM decodes to one character
        buf, eof, pos, n = "", False, 0, 0

        def more(size: int = _CHUNK) -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(size)
            if bar is not None:
                bar.update(len(chunk.encode("utf-8", "surrogateescape")))
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def skip_space() -> bool:
            """Past white space; False at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return True
                if not more():
                    return False

        if not skip_space() or buf[pos] != "[":
            raise AssertionError("an array file starts with [")  # _items looked
        pos += 1
        size = _CHUNK
        while True:
            if not skip_space():
                break  # not closed: files.py says so
            if buf[pos] == "]" and n == 0:
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number or literal may go on in the next chunk
                    raise ValueError
            except (ValueError, RecursionError):
                if more(size):
                    size *= 2  # an element longer than a chunk: read more at a time
                    continue
                break  # a broken element: files.py locates it
            size = _CHUNK
            if _BAD_BYTE.search(buf, pos, end):
                break  # files.py reports the byte where it is
            n += 1
            yield n, buf[pos:end], value
            pos = end
            if not skip_space():
                break
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                break
            pos += 1
    yield from _rest_of_broken_array(file, n)


def _rest_of_broken_array(file: str | Path, done: int) -> Iterator[Item]:
    """What files.py finds after the first `done` elements of an array that does not read as a whole."""
    with _open(file) as f:
        text = f.read().removeprefix(_BOM).decode("utf-8", "surrogateescape")
    for item in _scan_json_array(str(file), text):
        number = item.line if isinstance(item, Problem) else item[0]
        if number <= done:
            continue
        if isinstance(item, Problem):
            yield item
        else:
            yield item[0], json.dumps(item[1], ensure_ascii=False), item[1]
