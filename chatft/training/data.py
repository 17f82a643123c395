"""The data a training stage gets: SFT's prepared sets (read, validated, rendered, tokenized, cached), whether
training may start on them, and the datasets the Trainer takes (packed rows, or examples with their lengths)."""

from __future__ import annotations

import os

import datasets

from chatft.args import DataArguments, ModelArguments
from chatft.data.dataset import PreparedData, prepare_data
from chatft.packing import PackedDataset

DEFAULT_CACHE_DIR = "~/.cache/chatft/preprocessed"


def prepare_sft(
    files: list[str], data_args: DataArguments, model_args: ModelArguments, tokenizer, log
) -> PreparedData:
    """SFT examples from data files: read, validated, rendered with the model's template, tokenized, cached."""
    return prepare_data(
        files,
        data_args.train_format,
        tokenizer,
        model_args.template,
        data_args.max_seq_length,
        data_args.max_source_length,
        data_args.max_target_length,
        data_args.preprocessing_num_workers,
        log=log,
        cache_dir=preprocessing_cache_dir(data_args),
        overwrite_cache=data_args.overwrite_cache and prepares_data(data_args),
        chat_template_kwargs=data_args.chat_template_kwargs,
    )


def prepares_data(data_args: DataArguments) -> bool:
    """Whether this process prepares the data (flow.load_sets lets it go first): the first process of its node
    under torchrun or DeepSpeed, of all nodes with --data_shared_file_system; the others wait, then read its
    cache (so they never rewrite it, --overwrite_cache or not)."""
    return os.environ.get("RANK" if data_args.data_shared_file_system else "LOCAL_RANK", "0") == "0"


def preprocessing_cache_dir(data_args: DataArguments) -> str | None:
    if not data_args.preprocessing_cache:
        return None
    return data_args.preprocessing_cache_dir or os.environ.get("CHATFT_CACHE") or DEFAULT_CACHE_DIR


def data_refused(data_args: DataArguments, *prepared_sets) -> str | None:
    """Why training cannot start on these prepared sets (None ones are absent: no eval file), or None."""
    for prepared in filter(None, prepared_sets):
        if prepared.problems and not data_args.skip_invalid_records:
            return (
                f"{len(prepared.problems)} invalid record(s), listed above; fix them, or pass "
                "--skip_invalid_records to train without them"
            )
        if prepared.problems:
            print(f"skipping {len(prepared.problems)} invalid record(s) (--skip_invalid_records)")
        if len(prepared.dataset) == 0:
            return "no example left to train on"
    return None


def training_datasets(
    train: PreparedData,
    evaluation: PreparedData | None,
    packed_train: PackedDataset | None,
    data_args,
    training_args,
    log,
):
    """The datasets the Trainer gets: the packed rows (packed_train, when packing), or examples (with a length
    column to group them by), each filled up to a whole number of optimizer steps with empty items
    (chatft.packing says why)."""
    per_step = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size)
    )
    if packed_train is not None:
        packed_train.fill_steps(per_step)
        log(packed_train.summary())
        packed_eval = (
            PackedDataset(
                evaluation.dataset, data_args.max_seq_length, evaluation.stats.lengths, evaluation.folder
            )
            if evaluation
            else None
        )
        return packed_train, packed_eval
    columns = ["input_ids", "labels"]
    train_set = train.dataset.select_columns(columns)
    lengths = list(train.stats.lengths)
    fillers = -len(train_set) % per_step
    if fillers:
        empty = datasets.Dataset.from_dict({"input_ids": [[]] * fillers, "labels": [[]] * fillers})
        train_set = datasets.concatenate_datasets([train_set, empty.cast(train_set.features)])
        lengths += [0] * fillers
        log(f"batches: {fillers} empty item(s) complete the last step of an epoch")
    if training_args.group_by_length and training_args.train_sampling_strategy == "random":
        training_args.train_sampling_strategy = "group_by_length"
    if training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        train_set = train_set.add_column(training_args.length_column_name, lengths)
    log(
        f"batches: padded to the longest example of each batch, sampling {training_args.train_sampling_strategy}"
    )
    return train_set, evaluation.dataset.select_columns(columns) if evaluation else None
