"""Data files -> a tokenized datasets.Dataset of {input_ids, labels, file, record}, with the counts of everything
left out.

A record is one conversation and most often one example; with a chat template that renders earlier turns
differently once later turns follow (chatft.data.templates.plan_examples), it can be several, each with the same
`file` and `record` (the line of a .jsonl file, the 1-based element of a .json array). Truncation applies to each
example; the summary counts the conversations split, the examples they gave and the tokens that cost.

Shared by scripts/check_data.py and finetune.py, so the checker and training can never disagree.

With a cache folder, the result is kept on disk under a key made of everything that can change it: each data
file's name and content hash, the tokenizer's serialized files, the template, the format, the length settings and
the source of the data code, and the chat_template_kwargs. A second run with the same key loads it (memory-mapped Arrow) instead of
tokenizing; any change to one of them misses and tokenizes afresh.

The report on the result (DataStats, the Sanity Check) is stats.py; storing and loading a cache entry is cache.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from chatft.args import check_lengths
from chatft.data.cache import CACHE_FORMAT, file_digest, load_cached, save_cached, tokenizer_files
from chatft.data.formats import LoadedData, expand_paths, load_conversations
from chatft.data.schema import Conversation, Message, Problem, ToolCall
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
    "conversation_from_json",
    "conversation_to_json",
    "prepare_data",
    "sanity_check_lines",
    "tokenize_conversations",
    "tools_fallback_note",
]


@dataclass
class EncodeSettings:
    template: Template | None  # None: raw (input-output) data only
    max_seq_length: int = 2048
    max_source_length: int | None = None
    max_target_length: int | None = None


def conversation_to_json(conv: Conversation) -> str:
    return json.dumps(asdict(conv), ensure_ascii=False)


def conversation_from_json(text: str) -> Conversation:
    d = json.loads(text)
    messages = [
        Message(
            role=m["role"],
            content=m["content"],
            loss=m["loss"],
            tool_calls=[ToolCall(**c) for c in m["tool_calls"]],
            name=m["name"],
            reasoning=m.get("reasoning"),
        )
        for m in d["messages"]
    ]
    return Conversation(messages, d["tools"], d["raw"])


_COLUMNS = ("file", "record", "input_ids", "labels", "closers", "truncated", "error", "note", "examples")


def _encode_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, settings: EncodeSettings
) -> dict:
    """Each record -> one row per example (several for a conversation the template splits), or one row with
    its error. `examples` on a record's first row: (its examples, their tokens, its whole rendering's tokens)
    when it was split, else (1, 0, 0); (0, 0, 0) on its other rows."""
    out: dict[str, list] = {k: [] for k in _COLUMNS}

    def add(file: str, record: int, **row) -> None:
        for key in _COLUMNS:
            out[key].append({"file": file, "record": record, **row}[key])

    for file, record, text in zip(batch["file"], batch["record"], batch["conversation"], strict=True):
        try:
            conv = conversation_from_json(text)
            examples = encode_examples(
                conv, tokenizer, settings.template, settings.max_source_length, settings.max_target_length
            )
            split = (1, 0, 0)
            if len(examples) > 1:
                whole = render_conversation(conv, tokenizer, settings.template)
                whole_tokens = len(tokenizer(whole, add_special_tokens=False)["input_ids"])
                split = (len(examples), sum(len(e.input_ids) for e in examples), whole_tokens)
        except TemplateError as e:
            add(file, record, input_ids=[], labels=[], closers=[], truncated=False, error=str(e), note="",
                examples=(0, 0, 0))  # fmt: skip
            continue
        for k, enc in enumerate(examples):
            kept, cut = truncate(enc, settings.max_seq_length)
            note = _note(enc, kept, cut, settings)
            if note and len(examples) > 1:
                note = f"example {k + 1} of {len(examples)} (turns {', '.join(map(str, enc.turns))}): {note}"
            add(file, record, input_ids=kept.input_ids, labels=kept.labels, closers=kept.closers, truncated=cut,
                error="", note=note, examples=split if k == 0 else (0, 0, 0))  # fmt: skip
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


def tools_fallback_note(
    template: Template | None, tokenizer: PreTrainedTokenizerBase, conversations: Iterable[Conversation]
) -> str | None:
    """What to say when the data has tools and the chat template has no notion of them (None otherwise)."""
    if template is None or template_supports_tools(template, tokenizer):
        return None
    if not any(_has_tools(c) for c in conversations):
        return None
    return (
        "tools: the chat template has no notion of tools; rendering tool definitions as system text, tool "
        "calls as <tool_call> JSON in the assistant turn and results as <tool_response> user turns (README: "
        "Templates and labels)"
    )


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Labels need character offsets, which only fast (Rust) tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"the tokenizer ({type(tokenizer).__name__}) is a slow one, which gives no character offsets: chatft "
            "maps trained characters to tokens with them; give a model folder with a tokenizer.json (a fast "
            "tokenizer; transformers converts most slow ones: AutoTokenizer.from_pretrained(..., use_fast=True) "
            "then save_pretrained)"
        )


def tokenize_conversations(
    loaded: LoadedData,
    tokenizer: PreTrainedTokenizerBase,
    settings: EncodeSettings,
    num_proc: int | None = None,
) -> PreparedData:
    """Encode every valid record; a record the template cannot render becomes a located problem."""
    start = time.perf_counter()
    if not loaded.records:  # nothing valid: datasets.map on an empty dataset adds no columns
        empty = datasets.Dataset.from_dict({"input_ids": [], "labels": [], "file": [], "record": []})
        stats = DataStats(records_read=loaded.records_read, invalid=loaded.invalid)
        return PreparedData(empty, stats, list(loaded.problems), loaded.formats)
    raw = datasets.Dataset.from_dict(
        {
            "file": [f for f, _, _ in loaded.records],
            "record": [line for _, line, _ in loaded.records],
            "conversation": [conversation_to_json(c) for _, _, c in loaded.records],
        }
    )
    encoded = raw.map(  # more rows than records where a conversation is split
        _encode_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) >= 2 * num_proc else None,
        remove_columns=raw.column_names,
        desc="tokenizing",
    )
    problems = list(loaded.problems)
    files, records, errors = encoded["file"], encoded["record"], encoded["error"]
    problems.extend(
        Problem(f, r, "(template)", e) for f, r, e in zip(files, records, errors, strict=True) if e
    )
    has_trained = [any(label != IGNORE_INDEX for label in labels) for labels in encoded["labels"]]
    keep = [i for i, (e, t) in enumerate(zip(errors, has_trained, strict=True)) if not e and t]
    n_errors = sum(1 for e in errors if e)
    stats = DataStats(
        records_read=loaded.records_read,
        valid=len(loaded.records) - n_errors,
        invalid=loaded.invalid + n_errors,
        skipped=sum(1 for e, t in zip(errors, has_trained, strict=True) if not e and not t),
    )
    notes = encoded["note"]
    stats.notes = [f"{files[i]}:{records[i]}: {n}" for i, n in enumerate(notes) if n][:NOTES_SHOWN]
    split = [e for e in encoded["examples"] if e[0] > 1]
    stats.split, stats.split_examples = len(split), sum(e[0] for e in split)
    stats.split_tokens, stats.split_whole_tokens = sum(e[1] for e in split), sum(e[2] for e in split)
    dataset = encoded.select(keep).remove_columns(["error", "truncated", "closers", "note", "examples"])
    truncated = encoded["truncated"]
    stats.truncated = sum(1 for i in keep if truncated[i])
    stats.lengths = [len(x) for x in dataset["input_ids"]]
    stats.trained_tokens = sum(
        sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset["labels"]
    )
    all_closers = encoded["closers"]
    closers = Counter(c for i in keep for c in all_closers[i])
    stats.closing_tokens = {tokenizer.convert_ids_to_tokens(c): n for c, n in closers.most_common()}
    stats.seconds = time.perf_counter() - start
    problems.sort(key=lambda p: (p.file, p.line))
    return PreparedData(dataset, stats, problems, loaded.formats)


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
    """Read, validate and tokenize; with cache_dir, load the result of an identical earlier call from there.
    chat_template_kwargs (a dict or its JSON text) go to every rendering of the chat template.

    stats.seconds is the wall time of this call; stats.cache is the folder it was loaded from ("" if tokenized).
    """
    start = time.perf_counter()
    check_lengths(max_seq_length, max_source_length, max_target_length)
    check_tokenizer(tokenizer)
    template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
    folder = None
    if cache_dir is not None:
        key = cache_key(
            paths,
            fmt,
            tokenizer,
            template_name,
            max_seq_length,
            max_source_length,
            max_target_length,
            chat_template_kwargs=template_kwargs,
        )
        folder = Path(cache_dir).expanduser() / key
        if not overwrite_cache:
            cached = load_cached(folder, log)
            if cached is not None:
                cached.stats.seconds = time.perf_counter() - start
                return cached
    lines: list[str] = []

    def log_and_keep(line: str) -> None:
        lines.append(line)
        log(line)

    loaded = load_conversations(paths, fmt, log=log_and_keep)
    raw_only = all(c.raw for _, _, c in loaded.records)
    template = None if raw_only else get_template(template_name, tokenizer, template_kwargs)
    note = tools_fallback_note(template, tokenizer, (c for _, _, c in loaded.records))
    if note:
        log_and_keep(note)
    settings = EncodeSettings(template, max_seq_length, max_source_length, max_target_length)
    prepared = tokenize_conversations(loaded, tokenizer, settings, num_proc)
    if folder is not None and len(prepared.dataset):  # nothing to train on is not worth keeping
        save_cached(folder, prepared, lines)
        # later steps (training) read the memory-mapped copy, as a cached run would
        prepared.dataset = datasets.load_from_disk(str(folder / "dataset"))
    prepared.stats.seconds = time.perf_counter() - start
    return prepared


# ----------------------------------------------------------------------------------------------------------------
# the cache key: what the prepared data depends on (cache.py stores and loads the entries)

_DATA_CODE = (  # the modules whose code makes the prepared data
    "schema.py",
    "files.py",
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
) -> str:
    """Hex digest of everything the prepared data depends on (DataFileError for a missing path)."""
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
        add("content", file_digest(path).encode())
    for name, data in tokenizer_files(tokenizer):
        add(f"tokenizer/{name}", data)
    return h.hexdigest()[:32]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""
