"""The steps every stage takes in the same order, with the same failures: bad input (arguments, data, templates)
stops a run with exit status 2 and one `error:` line, data that cannot be trained on with status 1 (StageError,
turned into the status by run_stage). A stage's main is its own steps between these."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import set_seed

from chatft.args import RUN_ARGS_FILE, ModelArguments
from chatft.data.check import position_warning
from chatft.data.formats import DataFileError
from chatft.data.templates import TemplateError
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.training.checkpoints import resolve_resume, save_run
from chatft.training.data import data_refused
from chatft.training.process import add_process_callbacks
from chatft.training.samples import base_model
from chatft.training.time_budget import add_time_budget


class StageError(Exception):
    """A run that cannot go on: its message is printed as `error: ...`, its status returned."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def run_stage(body: Callable[[], int]) -> int:
    try:
        return body()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


@contextmanager
def bad_input_stops() -> Iterator[None]:
    """Arguments, data files and templates that cannot be used: status 2 (InferError is a ValueError)."""
    try:
        yield
    except (DataFileError, TemplateError, ValueError) as e:
        raise StageError(str(e), 2) from e


def sft_only(training_args, stage: str) -> None:
    """A usage error for the SFT-only arguments given to another stage (inside bad_input_stops)."""
    if getattr(training_args, "compile_layers", None):
        raise ValueError(f"--compile_layers is for --stage sft; --stage {stage} runs its layers eagerly")


def start_from(model_args: ModelArguments, adapter: str | None, log: Callable[[str], None]) -> None:
    """With --adapter: the base its adapter_config.json names (unless --model_name_or_path is given) and the
    tokenizer saved beside it; the chat template the start folder (adapter or model) was trained with, unless
    --template is given."""
    folder = adapter
    if folder:
        config_file = Path(folder) / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"--adapter {folder}: not a peft adapter folder (no adapter_config.json)")
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if model_args.model_name_or_path == str(DEFAULT_MODEL_DIR) and base and Path(base).is_dir():
            model_args.model_name_or_path = base
            log(f"base model: {base} (from {config_file})")
        if model_args.tokenizer_name_or_path is None and (Path(folder) / "tokenizer_config.json").is_file():
            model_args.tokenizer_name_or_path = folder
    run_args = Path(folder or model_args.model_name_or_path) / RUN_ARGS_FILE
    if model_args.template is None and run_args.is_file():
        trained = (json.loads(run_args.read_text(encoding="utf-8")).get("model") or {}).get("template")
        if trained:
            model_args.template = trained
            log(f"chat template: {trained} (as {run_args.parent} was trained)")


def load_sets(
    training_args,
    data_args,
    prepare: Callable[[list[str]], Any],
    report: Callable[[Any], Iterable[str]],
    log: Callable[[str], None],
    what: str = "",
) -> tuple[Any, Any | None]:
    """(train, eval or None): each data set prepared (the first process of each node first, of all nodes with
    --data_shared_file_system: the others wait, then read its cache; each says which it read) and reported;
    refused when it has invalid records (unless skipped) or nothing to train on."""
    prepared = []
    first = training_args.main_process_first(
        local=not data_args.data_shared_file_system, desc="preprocessing"
    )
    with bad_input_stops(), first:
        for name, files in (("train", data_args.train_file), ("eval", data_args.eval_file)):
            if not files:
                prepared.append(None)
                continue
            log(f"--- {name} data{what} ---")
            prepared.append(prepare(files))
            for line in report(prepared[-1]):
                log(line)
            if training_args.world_size > 1 and training_args.process_index != 0:
                print(_read_by_another(training_args.process_index, name, prepared[-1]), flush=True)
    refusal = data_refused(data_args, *prepared)
    if refusal:
        raise StageError(refusal, 1)
    return prepared[0], prepared[1]


def _read_by_another(process: int, name: str, prepared: Any) -> str:
    """What a process that did not print the data report says about its data (one line)."""
    stats = getattr(prepared, "stats", None)
    cache = getattr(stats, "cache", "")
    if cache:
        by = f", prepared by {stats.prepared_by}" if stats.prepared_by else ""
        return f"[process {process}] {name} data: read from the cache {cache}{by}"
    return f"[process {process}] {name} data: prepared by this process (no cache to share)"


def seeded_model(training_args, build: Callable[[], Any]) -> tuple[str | None, Any]:
    """(the checkpoint to resume from or None, the model): the seed set before the model is built (LoRA and
    prefix weights are random), so that the same command builds the same model."""
    set_seed(training_args.seed)
    with bad_input_stops():
        resume = resolve_resume(training_args)
        return resume, build()


def warn_positions(model, max_seq_length: int, lengths: list[int], log: Callable[[str], None]) -> None:
    warning = position_warning(base_model(model).config, max_seq_length, lengths)
    if warning:
        log(warning)


def train_and_save(
    trainer, model, training_args, run_args: dict, resume: str | None, log: Callable[[str], None]
) -> None:
    """The end every TRL stage shares: the process callbacks (memory, threads) and --time_budget, training (from
    the checkpoint when resuming), and the model saved with the run's arguments."""
    add_process_callbacks(trainer, training_args, log)
    add_time_budget(trainer, training_args, resume, log)
    trainer.train(resume_from_checkpoint=resume)
    model.config.use_cache = True  # off for training only; the saved model generates with its cache
    save_run(trainer, training_args, run_args, log)
