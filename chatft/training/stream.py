"""--streaming: the training data read, validated, tokenized and packed as training goes, for data larger than the
preprocessing cache should hold (docs/training.md "Streaming").

The records of every file (local, or any fsspec URL) go through a shuffle buffer (Hugging Face datasets'
IterableDataset, --buffer_size records, seeded), are split between the processes (split_dataset_by_node: whole
files per process when their number divides evenly, else every process reads all and keeps its share), and are
validated and tokenized exactly as the cached pipeline does (chatft.data.dataset's _encode_batch: the same
labels). Examples are packed online into rows of max_seq_length (best fit among a few open rows, the oldest given
to training when a new one must open; a pass over the data ends in whole rows), or padded per batch with
--packing false. The stream never ends: at the end of the data the next pass starts, reshuffled
(set_epoch), so an "epoch" is not a step count the Trainer knows: --max_steps (or --time_budget) says how long
to train.

Exact resume: the stream is a pure function of the data, the seed and the process, so a resumed run rebuilds it
and skips, without training, the rows the checkpoint's steps consumed (re-tokenizing them, a small fraction of
what training them cost); each checkpoint also records what each process had consumed (stream_state_N.json), and
the resumed stream checks that it reached the same place. Invalid records stop the run where they are met (the
file, line and field named), or with --skip_invalid_records are counted, the first ones named.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback

from chatft.data.dataset import ENCODED_FEATURES, EncodeSettings, _encode_batch
from chatft.data.raw import RAW_FEATURES, RawData, file_format, items
from chatft.data.rendering import get_template
from chatft.data.schema import Problem
from chatft.data.stats import NOTES_SHOWN
from chatft.packing import packed_row

OPEN_ROWS = 8  # rows being filled at once by the online packer
STATE_FILE = "stream_state_{}.json"


class StreamError(ValueError):
    """An invalid record met in the stream without --skip_invalid_records (a located message)."""


def stream_files(files: list[str]) -> list[str]:
    """Local directories expanded to their data files (as the cached pipeline does); URLs kept as given."""
    from chatft.data.files import expand_paths

    local = [f for f in files if "://" not in f]
    expanded = {f: [str(p) for p in expand_paths([f])] for f in local}
    return [p for f in files for p in expanded.get(f, [f])]


def _raw_rows(files: list[str]) -> Iterator[dict]:
    """The raw rows (chatft.data.raw) of these files: the generator behind the IterableDataset, one shard a file."""
    for name in files:
        for item in items(name):
            if isinstance(item, Problem):
                yield {
                    "file": name,
                    "record": item.line,
                    "text": "",
                    "field": item.field,
                    "error": item.message,
                }
            else:
                yield {"file": name, "record": item[0], "text": item[1], "field": "", "error": ""}


class StreamedRows(torch.utils.data.IterableDataset):
    """The training rows of this process, without end (see the module docstring). Counts what it met: records,
    invalid ones, examples skipped (no trained token) and truncated, rows and examples given to training."""

    reads_own_share = (
        True  # ChatTrainer gives it a plain DataLoader (accelerate would dispatch or re-read it)
    )

    def __init__(
        self,
        encoded: datasets.IterableDataset,
        max_seq_length: int,
        packing: bool,
        skip_invalid: bool,
        log: Callable[[str], None],
    ) -> None:
        self.encoded = encoded
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.skip_invalid = skip_invalid
        self.log = log
        self.skip_rows = 0  # rows to pass over (a resumed run: those its checkpoint's steps trained)
        self.expected: dict | None = None  # what the checkpoint recorded of this process's stream
        self.files: set[str] = set()  # the files its records came from
        self.counts = dict.fromkeys(
            ("rows", "examples", "records", "invalid", "skipped", "truncated", "passes"), 0
        )

    def __iter__(self) -> Iterator[dict]:
        for k in self.counts:
            self.counts[k] = 0
        skip, rows = self.skip_rows, self._rows()
        for _ in range(skip):
            next(rows)
        if skip:
            self.log(
                f"streaming: resumed after {skip} rows ({self.counts['examples']} examples) of this process"
            )
        if self.expected is not None and (self.expected["rows"], self.expected["examples"]) != (
            self.counts["rows"],
            self.counts["examples"],
        ):
            raise StreamError(
                f"streaming: the checkpoint's stream had given {self.expected['rows']} rows of "
                f"{self.expected['examples']} examples to training, this one {self.counts['rows']} of "
                f"{self.counts['examples']}: the data, the seed or the settings changed since; resume with the same"
            )
        yield from rows

    def _rows(self) -> Iterator[dict]:
        open_rows: list[list[dict]] = []  # each: examples; filled best fit
        while True:
            self.encoded.set_epoch(self.counts["passes"])
            met = 0
            for example in self._examples():
                met += 1
                if not self.packing:
                    yield self._given(
                        [example], {"input_ids": example["input_ids"], "labels": example["labels"]}
                    )
                    continue
                n = len(example["input_ids"])
                fits = [
                    r for r in open_rows if sum(len(e["input_ids"]) for e in r) + n <= self.max_seq_length
                ]
                if fits:
                    min(fits, key=lambda r: self.max_seq_length - sum(len(e["input_ids"]) for e in r)).append(
                        example
                    )
                    continue
                if len(open_rows) == OPEN_ROWS:
                    row = open_rows.pop(0)  # the oldest
                    yield self._given(row, packed_row(row))
                open_rows.append([example])
            while open_rows:  # a pass ends in whole rows: the next one starts afresh, reshuffled
                row = open_rows.pop(0)
                yield self._given(row, packed_row(row))
            self.counts["passes"] += 1
            if not met:
                raise StreamError(
                    "streaming: the data has no example to train on (every record invalid or skipped)"
                )

    def _given(self, examples: list[dict], row: dict) -> dict:
        self.counts["rows"] += 1
        self.counts["examples"] += len(examples)
        return row

    def _examples(self) -> Iterator[dict]:
        for row in self.encoded:
            if row["examples"][0] > 0 or row["error"]:
                self.counts["records"] += 1
                self.files.add(row["file"])
            if row["error"]:
                self._invalid(row)
                continue
            if row["trained"] == 0:
                self.counts["skipped"] += 1
                if self.counts["skipped"] <= NOTES_SHOWN:
                    self.log(f"streaming: {row['file']}:{row['record']}: {row['note']}")
                continue
            self.counts["truncated"] += row["truncated"]
            yield row

    def _invalid(self, row: dict) -> None:
        where = f"{row['file']}:{row['record']}: {row['field']}: {row['error']}"
        if not self.skip_invalid:
            raise StreamError(
                f"invalid record in the stream: {where}; fix it, or pass --skip_invalid_records to train without "
                "the invalid records (counted, the first ones named)"
            )
        self.counts["invalid"] += 1
        if self.counts["invalid"] <= NOTES_SHOWN:
            self.log(f"streaming: skipping invalid record {where}")


def open_stream(
    files: list[str],
    data_args,
    model_args,
    training_args,
    tokenizer,
    packing: bool,
    log: Callable[[str], None],
) -> tuple[StreamedRows, dict[str, str]]:
    """This process's StreamedRows over the files, and the formats used (each file's detected from its first
    record, as the cached pipeline detects them)."""
    files = stream_files(files)
    found = RawData(datasets.Dataset.from_dict({}))
    for name in files:
        used = file_format(name, data_args.train_format, log, found)
        if used is None:
            raise StreamError(f"{name}: cannot detect the format of its records (give --train_format)")
        found.parse_as[name] = used
    raw_only = all(f == "input-output" for f in found.parse_as.values())
    template = (
        None if raw_only else get_template(model_args.template, tokenizer, data_args.chat_template_kwargs)
    )
    settings = EncodeSettings(
        template, data_args.max_seq_length, data_args.max_source_length, data_args.max_target_length
    )
    source = datasets.IterableDataset.from_generator(
        _raw_rows, gen_kwargs={"files": files}, features=RAW_FEATURES
    )
    source = source.shuffle(seed=training_args.seed, buffer_size=data_args.buffer_size)
    world, rank = max(1, training_args.world_size), training_args.process_index
    if world > 1:
        source = split_dataset_by_node(source, rank=rank, world_size=world)
    encoded = source.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings, "parse_as": found.parse_as},
        remove_columns=list(RAW_FEATURES),
        features=ENCODED_FEATURES,
    )
    how = (
        "whole files per process"
        if world > 1 and len(files) % world == 0
        else "every process reads all files"
    )
    log(
        f"streaming: {len(files)} file(s) read as training goes, shuffled in a buffer of {data_args.buffer_size} "
        f"records (seed {training_args.seed})"
        + (f", split between {world} processes ({how}, each keeping its share)" if world > 1 else "")
        + (
            f", packed online into rows of <= {data_args.max_seq_length} tokens"
            if packing
            else ", padded per batch"
        )
    )
    rows = StreamedRows(encoded, data_args.max_seq_length, packing, data_args.skip_invalid_records, log)
    return rows, found.formats


def open_training_stream(
    data_args, model_args, training_args, tokenizer, packing: bool, log: Callable[[str], None]
) -> tuple[StreamedRows, dict[str, str], dict[str, int]]:
    """The SFT stage's stream, the formats and the closing tokens of its first examples, with the Sanity Check of
    the first one."""
    from collections import Counter

    from chatft.data.stats import sanity_check_lines

    log("--- train data (streamed) ---")
    rows, formats = open_stream(
        data_args.train_file, data_args, model_args, training_args, tokenizer, packing, log
    )
    first = first_examples(rows, 64)
    if not first:
        raise StreamError("streaming: no example to train on in the first records of the stream")
    for line in sanity_check_lines(list(first[0]["input_ids"]), list(first[0]["labels"]), tokenizer):
        log(line)
    closers = Counter(c for example in first for c in example["closers"])
    return rows, formats, {tokenizer.convert_ids_to_tokens(c): n for c, n in closers.most_common()}


def add_stream_state(trainer, rows: StreamedRows, training_args, resume: str | None) -> None:
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    process = training_args.process_index
    trainer.add_callback(StreamState(rows, per_step, process, resumed_counts(resume, process)))


def first_examples(rows: StreamedRows, count: int) -> list[dict]:
    """The first `count` examples this process's stream gives (for the Sanity Check and the closing tokens),
    read apart from training: the stream itself restarts when training begins."""
    taken: list[dict] = []
    for example in rows._examples():
        taken.append(example)
        if len(taken) == count:
            break
    for k in rows.counts:
        rows.counts[k] = 0
    return taken


def check_streaming_arguments(data_args, training_args) -> None:
    """What --streaming needs and what it changes in the Trainer's arguments."""
    if training_args.max_steps <= 0 or training_args.time_budget:
        raise ValueError("--streaming: give --max_steps (a stream has no length to count epochs or time by)")
    if data_args.eval_file:
        raise ValueError(
            "--streaming: --eval_file is not read from a stream; evaluate the saved model with inference.py "
            "--input_file, or train without --streaming"
        )
    if data_args.packed_batch_unit != "rows":
        data_args.packed_batch_unit = "rows"  # a stream's examples per row are not known ahead
    training_args.ignore_data_skip = True  # the stream skips what the checkpoint trained (StreamState)
    training_args.dataloader_num_workers = 0  # the stream is read in the training process


class StreamState(TrainerCallback):
    """At each save, stream_state_N.json in the checkpoint: what process N had given to training. On resume, the
    stream skips the rows of the steps done and says where it is."""

    def __init__(self, rows: StreamedRows, rows_per_step: int, process: int, resumed: dict | None) -> None:
        self.rows = rows
        self.rows_per_step = rows_per_step
        self.process = process
        self.resumed = resumed

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows.skip_rows = state.global_step * self.rows_per_step
        self.rows.expected = self.resumed

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / STATE_FILE.format(self.process)).write_text(
                json.dumps({"global_step": state.global_step, **self.rows.counts}, indent=1)
            )

    def on_train_end(self, args, state, control, **kwargs):
        c = self.rows.counts
        print(
            f"[process {self.process}] streaming: {c['rows']} rows of {c['examples']} examples trained from "
            f"{c['records']} records met ({c['passes']} whole pass(es) over the data), {c['invalid']} invalid "
            f"skipped, {c['skipped']} skipped with no trained token, {c['truncated']} truncated; read from "
            f"{', '.join(sorted(Path(f).name for f in self.rows.files))}",
            flush=True,
        )


def resumed_counts(checkpoint: str | None, process: int) -> dict | None:
    """What the checkpoint recorded for this process (None: none)."""
    if not checkpoint:
        return None
    path = Path(checkpoint) / STATE_FILE.format(process)
    return json.loads(path.read_text()) if path.is_file() else None
