"""Data files -> a tokenized datasets.Dataset of {input_ids, labels, file, record}, with the counts of everything
left out.

A record is one conversation and most often one example; with a chat template that renders earlier turns
differently once later turns follow (chatft.data.templates.plan_examples), it can be several, each with the same
`file` and `record` (the line of a .jsonl file, the 1-based element of a .json array). Truncation applies to each
example; the summary counts the conversations split, the examples they gave and the tokens that cost.

Shared by scripts/check_data.py and finetune.py, so the checker and training can never disagree.

Memory does not grow with the data: the records are read in a stream into an Arrow file (raw.py), parsed,
validated, rendered and tokenized by worker processes (datasets.map; --preprocessing_num_workers, by default the
cores) into Arrow files, memory-mapped; the statistics are read from their small columns (length, trained
tokens, notes), never from the token lists. What stays in memory is O(examples) integers (the lengths).

With a cache folder, the result is kept on disk under a key made of everything that can change it: each data
file's name and content hash, the tokenizer's serialized files, the template, the format, the length settings and
the source of the data code, and the chat_template_kwargs. A second run with the same key loads it (memory-mapped Arrow) instead of
tokenizing; any change to one of them misses and tokenizes afresh.

The report on the result (DataStats, the Sanity Check) is stats.py; storing and loading a cache entry is cache.py.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from chatft.args import check_lengths
from chatft.data.cache import (
    CACHE_FORMAT,
    KEPT_COLUMNS,
    encoded_dataset,
    entry_lock,
    file_digest,
    load_cached,
    new_entry,
    save_cached,
    tokenizer_files,
)
from chatft.data.files import _json_message, expand_paths
from chatft.data.raw import RawData, read_raw, release_dataset_pages, release_mapped_pages
from chatft.data.readers import parse_record
from chatft.data.schema import Conversation, Problem, RecordError
from chatft.data.stats import NOTES_SHOWN, DataStats, PreparedData, sanity_check_lines
from chatft.data.templates import (
    IGNORE_INDEX,
    Encoded,
    Template,
    TemplateError,
    encode_examples,
    get_template,
    parse_chat_template_kwargs,
    render_conversation,
    template_supports_tools,
    truncate,
)

__all__ = [
    "NOTES_SHOWN",
    "DataStats",
    "EncodeSettings",
    "PreparedData",
    "cache_key",
    "check_tokenizer",
    "prepare_data",
    "sanity_check_lines",
    "tokenize_records",
    "tools_fallback_note",
]


@dataclass
class EncodeSettings:
    template: Template | None  # None: raw (input-output) data only
    max_seq_length: int = 2048
    max_source_length: int | None = None
    max_target_length: int | None = None


ENCODED_FEATURES = datasets.Features(
    {
        "file": datasets.Value("string"),
        "record": datasets.Value("int64"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # len(input_ids)
        "trained": datasets.Value("int32"),  # labels that are not IGNORE_INDEX
        "closers": datasets.List(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
        "field": datasets.Value("string"),  # with error: the record's problem, located
        "error": datasets.Value("string"),
        "note": datasets.Value("string"),
        # on a record's first row: (its examples, their tokens, its whole rendering's tokens) when the template
        # split it, else (1, 0, 0); (0, 0, 0) on its other rows and on an invalid record's row
        "examples": datasets.List(datasets.Value("int64")),
        "tools": datasets.Value("bool"),  # the record has tools, tool calls or tool results
    }
)


def _encode_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    settings: EncodeSettings,
    parse_as: dict[str, str],
    arrays: bool = False,
) -> dict:
    """Each raw record (chatft.data.raw) -> parsed, validated, one row per example (several for a conversation
    the template splits), or one row with its located problem. arrays: each row's input_ids and labels as an int32
    numpy array (a ninth of the memory of a list while the batch is built), else a list."""
    out: dict[str, list] = {k: [] for k in ENCODED_FEATURES}

    def add(file: str, record: int, **row) -> None:
        row = {**_EMPTY, "file": file, "record": record, **row}
        if arrays:
            row["input_ids"] = np.asarray(row["input_ids"], dtype=np.int32)
            row["labels"] = np.asarray(row["labels"], dtype=np.int32)
        for key in ENCODED_FEATURES:
            out[key].append(row[key])

    for file, record, text, field, error in zip(
        batch["file"], batch["record"], batch["text"], batch["field"], batch["error"], strict=True
    ):
        if error:
            add(file, record, field=field, error=error)
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            add(file, record, field="(json)", error=_json_message(e))
            continue
        try:
            conv = parse_record(value, parse_as[file])
        except RecordError as e:
            add(file, record, field=e.field, error=e.message)
            continue
        try:
            examples = encode_examples(
                conv, tokenizer, settings.template, settings.max_source_length, settings.max_target_length
            )
            split = (1, 0, 0)
            if len(examples) > 1:
                whole = render_conversation(conv, tokenizer, settings.template)
                whole_tokens = len(tokenizer(whole, add_special_tokens=False)["input_ids"])
                split = (len(examples), sum(len(e.input_ids) for e in examples), whole_tokens)
        except TemplateError as e:
            add(file, record, field="(template)", error=str(e))
            continue
        for k, enc in enumerate(examples):
            kept, cut = truncate(enc, settings.max_seq_length)
            note = _note(enc, kept, cut, settings)
            if note and len(examples) > 1:
                note = f"example {k + 1} of {len(examples)} (turns {', '.join(map(str, enc.turns))}): {note}"
            add(file, record, input_ids=kept.input_ids, labels=kept.labels, length=len(kept.input_ids),
                trained=len(kept.labels) - kept.labels.count(IGNORE_INDEX), closers=kept.closers,
                truncated=cut, note=note, examples=split if k == 0 else (0, 0, 0), tools=_has_tools(conv))  # fmt: skip
    return out


_EMPTY = {  # a row's columns when not given
    "field": "",
    "error": "",
    "note": "",
    "tools": False,
    "input_ids": [],
    "labels": [],
    "length": 0,
    "trained": 0,
    "closers": [],
    "truncated": False,
    "examples": (0, 0, 0),
}


def _encode_raw_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    settings: EncodeSettings,
    parse_as: dict[str, str],
    raw_file: str,
) -> dict:
    """_encode_batch on a batch of the memory-mapped raw table, whose pages read so far are then released from
    this process's resident memory (raw.release_mapped_pages, ~3 ms against the second or more a batch of
    ENCODE_BATCH records takes): its RSS does not grow with the data."""
    out = _encode_batch(batch, tokenizer, settings, parse_as, arrays=True)
    release_mapped_pages(raw_file)
    return out


def _note(enc: Encoded, kept: Encoded, cut: bool, settings: EncodeSettings) -> str:
    """Why an example is skipped (no trained token) or what truncation did to it; "" when it is whole."""
    if not any(label != IGNORE_INDEX for label in enc.labels):
        return "skipped: no trained token (no assistant turn is trained: loss false, or no answer)"
    if not any(label != IGNORE_INDEX for label in kept.labels):
        return (
            f"skipped: no trained token left after truncation to max_seq_length {settings.max_seq_length} "
            f"(its first trained turn ends at token {enc.turn_ends[0]})"
        )
    if not cut:
        return ""
    if len(kept.input_ids) < len(enc.input_ids):
        dropped = len(enc.turn_ends) - len(kept.turn_ends)
        how = (
            f"{dropped} later trained turn(s) dropped"
            if kept.turn_ends
            else "cut inside its first trained turn"
        )
        return f"truncated: {len(enc.input_ids)} -> {len(kept.input_ids)} tokens ({how})"
    return "truncated: prompt or response cut to max_source_length / max_target_length"


def _has_tools(conv: Conversation) -> bool:
    return conv.tools is not None or any(m.tool_calls or m.role == "tool" for m in conv.messages)


TOOLS_FALLBACK_NOTE = (
    "tools: the chat template has no notion of tools; rendering tool definitions as system text, tool "
    "calls as <tool_call> JSON in the assistant turn and results as <tool_response> user turns (README: "
    "Templates and labels)"
)


def tools_fallback_note(
    template: Template | None, tokenizer: PreTrainedTokenizerBase, conversations: Iterable[Conversation]
) -> str | None:
    """What to say when the data has tools and the chat template has no notion of them (None otherwise)."""
    if template is None or template_supports_tools(template, tokenizer):
        return None
    return TOOLS_FALLBACK_NOTE if any(_has_tools(c) for c in conversations) else None


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Labels need character offsets, which only fast (Rust) tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"the tokenizer ({type(tokenizer).__name__}) is a slow one, which gives no character offsets: chatft "
            "maps trained characters to tokens with them; give a model folder with a tokenizer.json (a fast "
            "tokenizer; transformers converts most slow ones: AutoTokenizer.from_pretrained(..., use_fast=True) "
            "then save_pretrained)"
        )


MIN_RECORDS_PER_WORKER = 5_000  # below this a worker process costs more to start than it saves


def default_workers(records: int, cores: int | None = None) -> int:
    """Worker processes for tokenizing when --preprocessing_num_workers is not given: the cores this process may
    use (affinity, CPU quota), no more than one per MIN_RECORDS_PER_WORKER records."""
    if cores is None:
        from chatft.threads import cgroup_cpu_limit

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        quota = cgroup_cpu_limit()
        cores = max(1, min(cores, int(quota))) if quota else cores
    return max(1, min(cores, records // MIN_RECORDS_PER_WORKER))


# records a worker encodes at a time, and the rows of one Arrow record batch: opening a file touches a page or so
# per batch (its header), in each worker and again in this process, so a million records in batches of 500 left
# ~300 MB of those pages resident at once; a batch of 2,000 records holds ~4 MB of token arrays in a worker
ENCODE_BATCH = 2_000


@contextmanager
def _workers_from_a_lean_process(workers: int) -> Iterator[None]:
    """With worker processes: start them (and datasets' progress-queue manager) from multiprocess's fork server, a
    fresh interpreter that has imported only this module and the main script (as spawned processes do: its
    top-level code runs there, so scripts calling this keep theirs under `if __name__ == "__main__"`), not from
    this process, and stop it after. Forked from here, each of them counted this process's pages (torch,
    transformers' model code: ~450 MB in finetune.py) as its own resident memory: a million records on two workers
    peaked at ~2 GB of RSS summed over the processes for ~0.8 GB of PSS, and a worker's garbage collector copied
    the pages it walked. One process: nothing."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)  # each process started re-imports it
    if workers < 2 or (main_file is not None and not os.path.isfile(main_file)):  # python - <script
        yield
        return
    import multiprocess
    from multiprocess import forkserver

    previous = multiprocess.get_start_method(allow_none=True)
    python_path = os.environ.get("PYTHONPATH")
    # the server does not get this process's sys.path (Python 3.11 ignores forkserver's sys_path): chatft's folder
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join([root, python_path] if python_path else [root])
    multiprocess.set_forkserver_preload(["__main__", __name__])  # once, in the server
    multiprocess.set_start_method("forkserver", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(previous, force=True)
        forkserver._forkserver._stop()  # idle, it would hold its imports (~150 MB) for the rest of the run
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path


def tokenize_records(
    raw: RawData,
    tokenizer: PreTrainedTokenizerBase,
    settings: EncodeSettings,
    folder: Path,
    num_proc: int | None = None,
    log: Callable[[str], None] = print,
    say: Callable[[str], None] = print,
) -> tuple[datasets.Dataset, DataStats, list[Problem]]:
    """Encode every raw record into folder (Arrow, one file per worker); the rows kept (valid, with a trained
    token), their statistics (read from the small columns, never the token lists) and the located problems.
    log: what a cached run replays; say: what only this run says."""
    start = time.perf_counter()
    workers = num_proc if num_proc else default_workers(len(raw.dataset))
    workers = max(1, min(workers, len(raw.dataset) // 2 or 1))
    say(f"tokenizing {len(raw.dataset)} records with {workers} process(es)")
    with _workers_from_a_lean_process(workers):
        encoded = raw.dataset.map(  # more rows than records where a conversation is split
            _encode_raw_batch,
            batched=True,
            batch_size=ENCODE_BATCH,
            writer_batch_size=ENCODE_BATCH,
            fn_kwargs={
                "tokenizer": tokenizer,
                "settings": settings,
                "parse_as": raw.parse_as,
                "raw_file": raw.dataset.cache_files[0]["filename"],
            },
            num_proc=workers if workers > 1 else None,
            remove_columns=raw.dataset.column_names,
            features=ENCODED_FEATURES,
            cache_file_name=str(folder / "encoded.arrow"),
            load_from_cache_file=False,
            desc="tokenizing",
        )
    release_dataset_pages(encoded)  # what opening the workers' files read (a page or so per record batch)
    tokenized = time.perf_counter()
    # the small columns only: filtering a table copies what it holds, and the token lists are most of the data
    table = encoded.data.table.select([c for c in ENCODED_FEATURES if c not in ("input_ids", "labels")])
    error = pc.not_equal(table.column("error"), "")
    has_trained = pc.greater(table.column("trained"), 0)
    keep = pc.and_(pc.invert(error), has_trained)
    problems = list(raw.problems)
    bad = table.filter(error).select(["file", "record", "field", "error"]).to_pydict()
    problems.extend(map(Problem, bad["file"], bad["record"], bad["field"], bad["error"]))
    problems.sort(key=lambda p: (p.file, p.line))
    first_rows = pc.list_element(table.column("examples"), 0)
    stats = DataStats(records_read=raw.records_read)
    stats.valid = pc.sum(pc.greater(first_rows, 0)).as_py() or 0
    stats.invalid = raw.records_read - stats.valid
    stats.skipped = pc.sum(pc.and_(pc.invert(error), pc.invert(has_trained))).as_py() or 0
    notes = table.filter(pc.not_equal(table.column("note"), "")).slice(0, NOTES_SHOWN)
    notes = notes.select(["file", "record", "note"]).to_pydict()
    stats.notes = [
        f"{f}:{r}: {n}" for f, r, n in zip(notes["file"], notes["record"], notes["note"], strict=True)
    ]
    split = table.filter(pc.greater(first_rows, 1)).column("examples").to_pylist()
    stats.split, stats.split_examples = len(split), sum(e[0] for e in split)
    stats.split_tokens, stats.split_whole_tokens = sum(e[1] for e in split), sum(e[2] for e in split)
    kept = table if pc.all(keep).as_py() else table.filter(keep)  # a filter copies, even when it keeps all
    stats.truncated = pc.sum(kept.column("truncated")).as_py() or 0
    stats.trained_tokens = pc.sum(kept.column("trained")).as_py() or 0
    stats.lengths = kept.column("length").to_pylist()
    closers = pc.value_counts(pc.list_flatten(kept.column("closers"))).to_pylist()
    closers.sort(key=lambda c: -c["counts"])  # most common first; ties keep the order first seen
    stats.closing_tokens = {tokenizer.convert_ids_to_tokens(c["values"]): c["counts"] for c in closers}
    tools = pc.any(table.column("tools")).as_py()
    if tools and settings.template is not None and not template_supports_tools(settings.template, tokenizer):
        log(TOOLS_FALLBACK_NOTE)
    if not pc.all(keep).as_py():
        np.save(folder / "keep.npy", np.flatnonzero(keep.to_numpy(zero_copy_only=False)))
    release_dataset_pages(encoded)  # the pages the statistics read
    now = time.perf_counter()
    stats.stages = {"tokenizing": tokenized - start, "statistics": now - tokenized}
    return encoded_dataset(folder), stats, problems


def prepare_data(
    paths: list[str],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str | None,
    max_seq_length: int = 2048,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] = print,
    *,
    cache_dir: str | os.PathLike | None = None,
    overwrite_cache: bool = False,
    chat_template_kwargs: str | dict | None = None,
) -> PreparedData:
    """Read, validate and tokenize in a stream into Arrow files on disk; with cache_dir, load the result of an
    identical earlier call from there (an entry being written by another process is waited for, then read).
    chat_template_kwargs (a dict or its JSON text) go to every rendering of the chat template. num_proc: the
    worker processes (None: default_workers).

    stats.seconds is the wall time of this call; stats.cache is the folder it was loaded from ("" if tokenized).
    """
    start = time.perf_counter()
    check_lengths(max_seq_length, max_source_length, max_target_length)
    check_tokenizer(tokenizer)
    template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
    if cache_dir is None:
        work = Path(tempfile.mkdtemp(prefix="chatft-data-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # memory-mapped until the process ends
        prepared = _prepare(paths, fmt, tokenizer, template_name, template_kwargs, max_seq_length,
                            max_source_length, max_target_length, num_proc, log, log, work)  # fmt: skip
        prepared.stats.seconds = time.perf_counter() - start
        return prepared
    key = cache_key(
        paths,
        fmt,
        tokenizer,
        template_name,
        max_seq_length,
        max_source_length,
        max_target_length,
        chat_template_kwargs=template_kwargs,
        digests_in=Path(cache_dir).expanduser(),
    )
    folder = Path(cache_dir).expanduser() / key
    with entry_lock(folder, log) as waited:
        cached = None if overwrite_cache and not waited else load_cached(folder, log)
        if cached is None:
            lines: list[str] = []

            def log_and_keep(line: str) -> None:
                lines.append(line)
                log(line)

            work = new_entry(folder)
            try:
                prepared = _prepare(paths, fmt, tokenizer, template_name, template_kwargs, max_seq_length,
                                    max_source_length, max_target_length, num_proc, log_and_keep, log, work)  # fmt: skip
                prepared.stats.prepared_by = process_name()
                if len(prepared.dataset):  # nothing to train on is not worth keeping
                    save_cached(work, folder, prepared, lines)
                    cached = load_cached(folder, lambda _line: None)  # the files in their place
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if cached is None:
                prepared.stats.seconds = time.perf_counter() - start
                return prepared
            cached.stats.cache, cached.stats.stages = "", prepared.stats.stages
            log(f"preprocessed by this process ({process_name()}) into the cache {folder}")
    cached.stats.seconds = time.perf_counter() - start
    return cached


def _prepare(
    paths: list[str],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str | None,
    template_kwargs: dict,
    max_seq_length: int,
    max_source_length: int | None,
    max_target_length: int | None,
    num_proc: int | None,
    log: Callable[[str], None],
    say: Callable[[str], None],
    work: Path,
) -> PreparedData:
    started = time.perf_counter()
    raw = read_raw(paths, fmt, work, log)
    read = time.perf_counter() - started
    raw_only = all(f == "input-output" for f in raw.parse_as.values())
    template = None if raw_only else get_template(template_name, tokenizer, template_kwargs)
    settings = EncodeSettings(template, max_seq_length, max_source_length, max_target_length)
    if not len(raw.dataset):  # nothing readable: datasets.map on an empty dataset adds no columns
        empty = datasets.Dataset.from_dict({k: [] for k in KEPT_COLUMNS})
        stats = DataStats(records_read=raw.records_read, invalid=raw.records_read)
        return PreparedData(empty, stats, list(raw.problems), raw.formats)
    dataset, stats, problems = tokenize_records(raw, tokenizer, settings, work, num_proc, log, say)
    stats.stages = {"reading": read, **stats.stages}
    (work / "raw.arrow").unlink(missing_ok=True)  # read by the map; memory-mapped no more
    return PreparedData(dataset, stats, problems, raw.formats)


def process_name() -> str:
    rank = os.environ.get("RANK")
    return f"rank {rank}, pid {os.getpid()}" if rank is not None else f"pid {os.getpid()}"


# ----------------------------------------------------------------------------------------------------------------
# the cache key: what the prepared data depends on (cache.py stores and loads the entries)

_DATA_CODE = (  # the modules whose code makes the prepared data
    "schema.py",
    "files.py",
    "raw.py",
    "fields.py",
    "readers.py",
    "formats.py",
    "rendering.py",
    "history.py",
    "labels.py",
    "templates.py",
    "stats.py",
    "cache.py",
    "dataset.py",
)


def cache_key(
    paths: list[str],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str | None,
    max_seq_length: int,
    max_source_length: int | None,
    max_target_length: int | None,
    *,
    chat_template_kwargs: dict | None = None,
    digests_in: Path | None = None,
) -> str:
    """Hex digest of everything the prepared data depends on (DataFileError for a missing path). digests_in: the
    cache folder, where the data files' digests are kept (file_digest)."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    settings = {
        "cache_format": CACHE_FORMAT,
        "format": fmt,
        "template": template_name,
        "max_seq_length": max_seq_length,
        "max_source_length": max_source_length,
        "max_target_length": max_target_length,
        "chat_template_kwargs": chat_template_kwargs or {},
        # the libraries that render and tokenize: a new release can change either
        "versions": {name: _version(name) for name in ("datasets", "transformers", "tokenizers", "jinja2")},
    }
    add("settings", json.dumps(settings, sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for name in _DATA_CODE:
        add(f"code/{name}", (here / name).read_bytes())
    for path in expand_paths(paths):
        add("file", str(path).encode())  # the name is recorded in the dataset and in every problem
        add("content", file_digest(path, digests_in).encode())
    for name, data in tokenizer_files(tokenizer):
        add(f"tokenizer/{name}", data)
    return h.hexdigest()[:32]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""
