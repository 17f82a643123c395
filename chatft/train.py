"""finetune.py's library side: arguments, data, model, Trainer, saving.

Defaults that differ from transformers' TrainingArguments (everything else is the Trainer's own):
- output_dir "output/finetune", logging_steps 10, save_steps 100, remove_unused_columns False (our datasets
  hold only what the model takes), report_to none unless asked.
- prediction_loss_only True: evaluation computes the loss only (no logits gathered over the eval set).
- Added: malloc_mmap_threshold (off by default; 1048576 trades 26-41% of the CPU speed for 0.4-0.7x the peak RSS),
  malloc_trim (auto: on for CPU training; the memory freed by a micro-batch goes back to the system).
- Added: chunked_loss True / loss_chunk_size (chatft.loss: the loss at trained positions only, LM head in
  chunks), group_by_length True (padded batches only: examples of similar length batched together).
- Added: precision auto (bf16 autocast where the machine multiplies bf16 faster, chatft.machine), micro_batch_size
  and max_memory (a step split into micro-batches from the memory they need; chatft.machine.plan_step).
- activation_checkpointing: unset means "auto": on only where one micro-batch of one row does not fit the memory
  budget (chatft.machine.plan_step); never for ptuning.
- --packing (DataArguments): unset means on for full / lora / qlora, off for ptuning (which cannot pack).
  With packing, per_device_train_batch_size still counts examples (--packed_batch_unit examples): a step's
  examples are turned into whole packed rows of up to max_seq_length tokens (packed_step); the log shows
  examples_per_step, tokens_per_step and trained_tokens_per_step so that packed and padded runs compare. On the
  CPU every row is padded to the longest row's length (one shape for oneDNN; the padding is a segment of its own).
Why these defaults: bench/RESULTS.md (measured on this project's CPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, Trainer, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from chatft.args import RUN_ARGS_FILE, STAGES, DataArguments, ModelArguments
from chatft.collator import PackedCollator, PadCollator
from chatft.data.check import position_warning, report_lines
from chatft.data.dataset import PreparedData, prepare_data
from chatft.data.formats import DataFileError, load_conversations
from chatft.data.templates import IGNORE_INDEX, TemplateError, get_template
from chatft.inference.evaluation import generation_scores
from chatft.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss, unsupported_reason, zero3_enabled
from chatft.machine import PRECISIONS, Shape, choose_precision, plan_step, precision_flags
from chatft.methods import (
    PREFIX_ENCODER_FILE,
    load_model,
    load_prefix_encoder,
    load_tokenizer,
    save_prefix_encoder,
)
from chatft.packing import (
    PackedDataset,
    PackingError,
    expect_packed,
    install_isolation_guard,
    register_packed_sdpa,
    rows_per_process,
)
from chatft.plot import plot_loss
from chatft.preference import requested_stage
from chatft.samples import SampleAnswers, base_model, generating, read_sample_prompts

DEFAULT_CACHE_DIR = "~/.cache/chatft/preprocessed"
PREFERENCE_STAGES = [s for s in STAGES if s != "sft"]  # chatft.preference.train runs them


@dataclass
class TrainArguments(Seq2SeqTrainingArguments):
    output_dir: str = field(
        default="output/finetune", metadata={"help": "Where checkpoints and the model go."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_steps: float = field(default=100, metadata={"help": "Save a checkpoint every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: datasets hold model inputs."}
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Activation checkpointing: less memory for 5-36%% more time per step. Unset: on only where a "
            "step would not fit comfortably in the memory available (never for ptuning).",
            "nargs": "?",
            "const": True,
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Go on from a checkpoint folder, or auto: the newest checkpoint in output_dir that was written "
            "whole (same data order, optimizer, scheduler and random state)."
        },
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluation computes the loss only (no logits kept over the eval set)."},
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss only at trained positions, the LM head in chunks (never the full-vocabulary "
            "logits of the batch); False: the model's own loss."
        },
    )
    loss_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "Trained positions per LM-head chunk (--chunked_loss)."}
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata={
            "help": "Linux (glibc), to save memory: blocks of at least this many bytes (tensors) get their own "
            "memory map and go back to the system when freed, e.g. 1048576. glibc's default raises this threshold "
            "as a run goes, so activations land in a heap that fragments; fixing it at 1 MiB (with checkpointing) "
            "took the CPU peak RSS to 0.42x (LoRA) / 0.73x (full) at 0.59x / 0.74x the speed: page faults "
            "(bench/RESULTS.md). 0: glibc's default. Ignored where MALLOC_MMAP_THRESHOLD_ is set."
        },
    )
    malloc_trim: bool | None = field(
        default=None,
        metadata={
            "help": "Linux (glibc): hand the memory freed by each micro-batch back to the system (malloc_trim) "
            "before the next, so the activations of varying shapes do not pile up in a fragmented heap. Unset "
            "(auto): on when training on the CPU, where it took the peak RSS of a LoRA epoch to 0.7x for ~1.2x "
            "the time (bench/RESULTS.md); off on a GPU."
        },
    )
    sample_prompts: str | None = field(
        default=None,
        metadata={
            "help": "A few prompts (a .txt file, one per line, or a data file in any training format: each "
            "record's conversation up to its last answer) answered greedily at every evaluation and save and at "
            "the end, printed and written to OUTPUT_DIR/samples.jsonl (and TensorBoard when it is on)."
        },
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "--sample_prompts: longest sample answer in tokens."}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 autocast (fp32 master weights) where it is faster, on a GPU that supports it or a "
            "CPU whose probe multiplies bf16 at least 1.2x as fast as fp32, else fp32 (fp16 on a GPU without "
            "bf16); or fp32, bf16, fp16. --bf16 / --fp16 also decide.",
            "choices": list(PRECISIONS),
        },
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows (packed) or examples per forward; a step of --per_device_train_batch_size runs as "
            "several (accumulated: the same training). Unset: on a GPU the largest that fits --max_memory or 90%% "
            "of its memory; on the CPU the fewest holding 512 tokens (more buy no speed there, only memory)."
        },
    )
    max_memory: float | None = field(
        default=None,
        metadata={
            "help": "GiB a training process may use; sizes the micro-batches (and checkpointing) to it."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Padded batches (no packing): batch examples of similar length together (the Trainer's "
            "train_sampling_strategy group_by_length), unless another train_sampling_strategy is given."
        },
    )

    def __post_init__(self) -> None:
        # unset (None) activation checkpointing means "auto" (chatft.machine.plan_step); the Trainer turns None
        # into False
        self.checkpointing_auto = (
            self.activation_checkpointing is None and self.gradient_checkpointing is None
        )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"--micro_batch_size must be at least 1, not {self.micro_batch_size}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"--max_memory must be a positive number of GiB, not {self.max_memory}")
        if self.precision == "fp32" and (self.bf16 or self.fp16):
            raise ValueError("--precision fp32 contradicts --bf16 / --fp16")
        super().__post_init__()


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainArguments))


# --help shows chatft's own arguments and these Trainer arguments, grouped; --help_all shows every one
HELP_GROUPS = {
    "steps and batches": ["output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                          "num_train_epochs"],
    "optimization": ["learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim"],
    "logging, saving, evaluation": ["logging_steps", "save_steps", "save_total_limit", "eval_strategy", "eval_steps",
                                    "per_device_eval_batch_size", "predict_with_generate", "generation_max_length",
                                    "sample_prompts", "sample_max_new_tokens", "report_to"],
    "precision and memory": ["bf16", "fp16", "use_cpu", "activation_checkpointing", "chunked_loss",
                             "malloc_mmap_threshold", "malloc_trim", "deepspeed"],
    "resume and seed": ["resume_from_checkpoint", "seed", "data_seed"],
}  # fmt: skip


def short_help(parser: HfArgumentParser, extra_groups: dict[str, list[str]] | None = None) -> str:
    """--help: chatft's arguments (model and method, data, and extra_groups) and the Trainer arguments of
    HELP_GROUPS, each with its help and default as the full parser has them."""
    import argparse

    actions: dict = {}
    for a in parser._actions:  # the first per name: a bool that defaults to True also has a --no_NAME action
        actions.setdefault(a.dest, a)
    view = argparse.ArgumentParser(
        prog="finetune.py",
        usage="finetune.py --train_file FILE [...] [--config run.yaml] [options]",
        description="Fine-tune a chat model on conversation data (chatft). The command line overrides --config.",
        epilog=f"--help_all lists all {len(actions) - 1} arguments: these and every other Trainer argument.",
        add_help=False,
    )
    view.add_argument("--config", metavar="FILE", help="a YAML file of these names and values")
    groups = {
        "model and method": [f.name for f in dataclasses.fields(ModelArguments)],
        "data": [f.name for f in dataclasses.fields(DataArguments)],
        **(extra_groups or {}),
        **{f"training: {title}": names for title, names in HELP_GROUPS.items()},
    }
    for title, names in groups.items():
        group = view.add_argument_group(title)
        for name in names:
            a = actions[name]
            text = a.help or ""  # argparse help texts: a percent sign is already written %%
            if a.default not in (None, [], "") and "default" not in text.lower():
                text += f" (default: {a.default})"
            boolean = a.nargs == "?"
            if boolean:
                metavar = "{True,False}"
            elif a.choices and len(a.choices) <= 8:
                metavar = "{" + ",".join(map(str, a.choices)) + "}"
            else:
                metavar = "NAME" if a.choices else "X"
            group.add_argument(
                a.option_strings[0],
                dest=name,
                help=text,
                metavar=metavar,
                nargs="+" if a.nargs == "+" else None,
            )
    return view.format_help()


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config FILE / --config=FILE value, the other arguments)."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def apply_config(parser: HfArgumentParser, path: str) -> None:
    """A run.yaml's values become the parser's defaults, so that the command line still wins. Values keep their
    YAML types (null is None, a mapping stays a dict: lr_scheduler_kwargs); strings go through the argument's
    own type (PyYAML reads 2e-4 as a string, which becomes the float); one value where a list is expected (one
    train_file) becomes a list of it."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not YAML ({str(e).splitlines()[0]})") from e
    if config is None:
        return
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of argument names to values")
    actions = {a.dest: a for a in parser._actions}
    unknown = [k for k in config if k not in actions or k == "help"]
    if unknown:
        raise ValueError(f"--config {path}: unknown argument(s): {', '.join(map(str, unknown))}")
    for key, value in config.items():
        if actions[key].nargs in ("+", "*") and not isinstance(value, list) and value is not None:
            config[key] = [value]
    parser.set_defaults(**config)


def cpu_distributed(argv: list[str]) -> list[str]:
    """torchrun on a machine with no GPU: accelerate counts the processes only with --use_cpu, and DeepSpeed
    needs its communication set up over gloo before the Trainer builds its config."""
    import torch

    if "LOCAL_RANK" not in os.environ or torch.cuda.is_available():  # not under torchrun/deepspeed, or a GPU
        return argv
    if "--deepspeed" in argv:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return argv if "--use_cpu" in argv else [*argv, "--use_cpu", "True"]


def parse_args(
    argv: list[str] | None = None,
    parser: HfArgumentParser | None = None,
    extra_help: dict[str, list[str]] | None = None,
) -> tuple:
    """(ModelArguments, DataArguments, TrainArguments), or the dataclasses of another parser (preference
    tuning's), from the command line and --config."""
    config, argv = split_config(list(sys.argv[1:] if argv is None else argv))
    parser = parser or make_parser()
    if "-h" in argv or "--help" in argv:
        print(short_help(parser, extra_help))
        raise SystemExit(0)
    if "--help_all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if config:
        apply_config(parser, config)
    argv = cpu_distributed(argv)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[-1]
    if not data_args.train_file:
        raise ValueError("--train_file is required (one or more .json/.jsonl files or directories)")
    given = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    if given:
        precision, why = given, f"--{given}"
    else:
        shape = Shape.of(model_args.model_name_or_path)
        precision, why = choose_precision(training_args.precision, shape, cuda, bool(training_args.deepspeed))
        flags = precision_flags(precision, cuda)
        if flags:  # the Trainer sets up its precision (and the CPU device) while it parses
            parsed = parser.parse_args_into_dataclasses(args=[*argv, *flags])
            training_args = parsed[-1]
    training_args.precision, training_args.precision_why = precision, why
    return parsed


def load_split(
    name: str, files: list[str], data_args: DataArguments, model_args: ModelArguments, tokenizer, log
):
    log(f"--- {name} data ---")
    prepared = prepare_data(
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
        overwrite_cache=data_args.overwrite_cache,
    )
    for line in report_lines(prepared, tokenizer):
        log(line)
    return prepared


def set_malloc_mmap_threshold(threshold: int) -> bool:
    """glibc mallopt(M_MMAP_THRESHOLD): a fixed threshold (which also turns off glibc's dynamic raising of it).
    True when set; False elsewhere (not glibc, 0, or the environment already chose)."""
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def start_process(training_args) -> Callable[[str], None]:
    """What every stage sets up per process: glibc's mmap threshold, no pinned memory on the CPU (nothing to pin
    for; torch would warn at every epoch). Returns the log function: the main process prints, the others not."""
    set_malloc_mmap_threshold(training_args.malloc_mmap_threshold)
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False
    return print if training_args.process_index == 0 else (lambda _msg: None)


def glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) (every arena's free pages back to the system), or None where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


class ReleaseFreedMemory(TrainerCallback):
    """--malloc_trim: after every micro-batch (and optimizer step), the freed memory goes back to the system."""

    def __init__(self, trim: Callable[[], object]) -> None:
        self.trim = trim

    def on_substep_end(self, args, state, control, **kwargs):
        self.trim()

    def on_step_end(self, args, state, control, **kwargs):
        self.trim()


def release_memory(trainer: Trainer, training_args, log: Callable[[str], None]) -> None:
    """--malloc_trim: on (auto: on the CPU), the ReleaseFreedMemory callback where glibc is there."""
    wanted = training_args.malloc_trim
    if wanted is None:
        wanted = training_args.device.type == "cpu"
    trim = glibc_malloc_trim() if wanted else None
    if trim is not None:
        trainer.add_callback(ReleaseFreedMemory(trim))
        log("memory: freed memory goes back to the system after every micro-batch (--malloc_trim)")


def preprocessing_cache_dir(data_args: DataArguments) -> str | None:
    if not data_args.preprocessing_cache:
        return None
    return data_args.preprocessing_cache_dir or os.environ.get("CHATFT_CACHE") or DEFAULT_CACHE_DIR


def resolve_packing(model_args: ModelArguments, data_args: DataArguments, log) -> bool:
    """--packing unset: on wherever it is safe (every method but ptuning)."""
    if model_args.method == "ptuning":
        if data_args.packing is not False:
            log(
                "packing: off. P-Tuning v2 cannot pack (its prefix is a key/value cache, which turns off the "
                "per-example attention); batches are padded to their longest example instead."
            )
        return False
    return data_args.packing is not False


def packed_step(packed: PackedDataset, data_args: DataArguments, training_args, log) -> None:
    """How many packed rows a step holds. --packed_batch_unit examples (the default): a step of
    per_device_train_batch_size x accumulation x processes examples becomes whole rows per process, from the data's
    examples per row (chatft.packing.rows_per_process). Counted in rows instead, a packed epoch has several times
    fewer optimizer steps than a padded one at the same learning rate, and ends worse (bench/RESULTS.md, the
    one-epoch race). How a process's rows are split into forward passes is then plan_micro_batches' choice."""
    processes = max(1, training_args.world_size)
    rows, per_row = packed.packed_rows, packed.examples_per_row
    asked = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    if data_args.packed_batch_unit == "examples":
        per_process = rows_per_process(asked * processes, per_row, processes, rows)
        training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps = per_process, 1
        asked_as, unit = f"of {asked * processes} examples (batch x accumulation x processes) ", ""
    else:
        per_process, asked_as, unit = asked, "", " (--packed_batch_unit rows)"
    on = f" on each of {processes} processes" if processes > 1 else ""
    log(
        f"packing: a step {asked_as}is {per_process} packed row(s){on}{unit}: {per_row:.2f} examples per row, about "
        f"{min(per_process * processes, rows) * per_row:.1f} examples a step (logged as examples_per_step)"
    )


def plan_micro_batches(model_args: ModelArguments, data_args: DataArguments, training_args, log) -> None:
    """A step of per_device_train_batch_size rows as micro-batches (chatft.machine.plan_step): the Trainer gets
    the micro-batch as its batch and the rest as more accumulation; checkpointing where it is left to chatft.
    Every stage calls it last among what sets the batch, so DeepSpeed is told the step here."""
    batch = training_args.per_device_train_batch_size
    plan = plan_step(
        batch,
        data_args.max_seq_length,
        Shape.of(model_args.model_name_or_path),
        model_args.method,
        training_args.precision in ("bf16", "fp16"),
        torch.cuda.is_available() and not training_args.use_cpu,
        training_args.max_memory,
        training_args.micro_batch_size,
        training_args.checkpointing_auto,
    )
    if plan.micro_batch < batch:
        training_args.per_device_train_batch_size = plan.micro_batch
        training_args.gradient_accumulation_steps *= batch // plan.micro_batch
        log(
            f"micro-batches: a step's {batch} rows per process run as {batch // plan.micro_batch} forward passes of "
            f"{plan.micro_batch} ({plan.why}); accumulated, they train exactly as one"
        )
    else:
        log(f"micro-batches: none, a step's {batch} rows in one forward pass ({plan.why})")
    if plan.checkpointing is not None:
        on = plan.checkpointing and model_args.method != "ptuning"
        training_args.gradient_checkpointing = training_args.activation_checkpointing = on
        if plan.checkpointing and not on:
            log("activation checkpointing: would be needed, but P-Tuning v2 cannot use it")
        else:
            log(f"activation checkpointing: {'on' if on else 'off'} (auto)")
    sync_deepspeed_batch(training_args)


def sync_deepspeed_batch(training_args) -> None:
    """DeepSpeed's configuration took the batch sizes ("auto") when the arguments were parsed; packed_step and
    plan_micro_batches may have changed them since: it gets the step as it runs."""
    ds = getattr(training_args, "hf_deepspeed_config", None)
    if ds is None:
        return
    micro, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    ds.config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * max(1, training_args.world_size),
    )


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
            PackedDataset(evaluation.dataset, data_args.max_seq_length, evaluation.stats.lengths)
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


def packed_attention(model, attn_implementation: str, log, cuda: bool = False) -> str:
    """The attention a packed run uses when the model's is sdpa. On the CPU, chatft's packed sdpa: one causal sdpa
    call per example, no block-diagonal mask over the row (chatft.packing); its boundaries are read on the host,
    which suits the CPU. On a GPU, flash attention's varlen kernel where flash-attn is installed (the collator
    flattens the batch and passes cu_seqlens), else transformers' sdpa with the block-diagonal mask it builds from
    the position ids. Other attentions stay: eager and flex get a block mask, flash its varlen kernel."""
    if (attn_implementation or "sdpa") != "sdpa":
        return attn_implementation
    if cuda:
        if importlib.util.find_spec("flash_attn") is not None:
            base_model(model).set_attn_implementation("flash_attention_2")
            log("packing: flash attention 2, varlen over the flattened batch (no padding, no mask)")
            return "flash_attention_2"
        log("packing: torch sdpa with a block-diagonal mask built from the position ids (no flash-attn here)")
        return attn_implementation
    name = register_packed_sdpa()
    base_model(model).set_attn_implementation(name)
    log("packing: attention by torch sdpa, causal, once per example (no block mask over the row)")
    return name


class ChatTrainer(Trainer):
    """The Trainer with chatft.loss (loss at trained positions, LM head in chunks) and step statistics.

    Logged with the loss: examples_per_step, tokens_per_step (non-pad) and trained_tokens_per_step, summed over
    processes; at the end: train_examples, train_tokens, train_trained_tokens and their rates per second.
    """

    def __init__(
        self,
        *args,
        chunked_loss: bool = True,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        generation_eval: Callable | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.loss_chunk_size = loss_chunk_size
        # packed rows: every attention call must keep the examples apart (chatft.packing.expect_packed)
        self.packed = isinstance(self.data_collator, PackedCollator)
        if self.packed:
            install_isolation_guard(self.accelerator.unwrap_model(self.model))
        reason = unsupported_reason(self.accelerator.unwrap_model(self.model)) if chunked_loss else None
        if reason and self.is_world_process_zero():
            print(f"chunked loss: off, {reason}; using the model's own loss")
        self.chunked_loss = chunked_loss and reason is None
        if self.chunked_loss:
            # chatft.loss divides by num_items_in_batch itself: have the Trainer count it, and not rescale
            self.model_accepts_loss_kwargs = True
        # examples, tokens (non-pad), trained tokens, positions (with padding) since the last log / in all
        self._window = torch.zeros(4, dtype=torch.long)
        self._total = torch.zeros(4, dtype=torch.long)
        self._window_start = None

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping by StepGroupedSampler instead of the Trainer's (which groups per process and draws
        from the global random state)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        if args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, datasets.Dataset):
            return super()._get_train_sampler(train_dataset)
        return StepGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            lengths=dataset[args.length_column_name],
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """P-Tuning v2: with the adapter (and with every checkpoint, which saves through here first), the whole
        prefix encoder: embedding, and with --prefix_projection the MLP, which an exact resume needs."""
        super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if is_prefix_tuning(model) and self.args.should_save:
            save_prefix_encoder(model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """P-Tuning v2: the whole prefix encoder (with --prefix_projection its MLP too, which peft's checkpoint
        lacks: it holds the projected prefix) from PREFIX_ENCODER_FILE; everything else as the Trainer does."""
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not is_prefix_tuning(peft_model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PREFIX_ENCODER_FILE
        if not path.is_file():
            raise ValueError(
                f"{resume_from_checkpoint} has no {PREFIX_ENCODER_FILE} (written by chatft with every P-Tuning "
                "checkpoint), so the prefix encoder cannot be restored exactly; continue from its prefix with "
                f"--ptuning_checkpoint {resume_from_checkpoint} instead (a new optimizer and schedule)"
            )
        load_prefix_encoder(peft_model, resume_from_checkpoint)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """The eval loss, and with --predict_with_generate the ROUGE/BLEU of greedy answers on the eval set."""
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None:
            scores = {f"eval_{k}": v for k, v in self.generation_eval(self.model).items()}
            self.log(scores)
            metrics.update(scores)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        num_examples = inputs.pop("num_examples", None)
        num_tokens = inputs.pop("num_tokens", None)
        if model.training:
            self._count(inputs, num_examples, num_tokens)
        with expect_packed(inputs.get("position_ids") if self.packed else None):
            if not self.chunked_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            loss, outputs = causal_lm_loss(model, inputs, labels, num_items_in_batch, self.loss_chunk_size)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, and the gradients are averaged over processes
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _count(self, inputs, num_examples, num_tokens) -> None:
        labels = inputs["labels"]
        if num_examples is None:
            num_examples = labels.shape[0]
            mask = inputs.get("attention_mask")
            num_tokens = mask.sum() if mask is not None else labels.numel()
        trained = (labels[..., 1:] != IGNORE_INDEX).sum()
        counts = [num_examples, num_tokens, trained, labels.numel()]
        counts = torch.stack([torch.as_tensor(x, device=labels.device).reshape(()) for x in counts])
        self._window = self._window.to(labels.device) + counts
        if self._window_start is None:
            self._window_start = self.state.global_step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # every process calls log() at the same points of training, so the sums over processes are safe here
        if "loss" in logs and self._window_start is not None:
            steps = max(1, self.state.global_step - self._window_start)
            window = self._flush()
            for name, value in zip(("examples", "tokens", "trained_tokens"), window[:3], strict=True):
                logs[f"{name}_per_step"] = round(value / steps, 2)
        if "train_runtime" in logs:
            self._flush()  # steps after the last logged one
            runtime = logs["train_runtime"] or 1.0
            examples, tokens, trained, positions = self._total.tolist()
            for name, value in (("examples", examples), ("tokens", tokens), ("trained_tokens", trained)):
                logs[f"train_{name}"] = value
                logs[f"train_{name}_per_second"] = round(value / runtime, 3)
            logs["train_padding_share"] = round(1 - tokens / positions, 4) if positions else 0.0
        super().log(logs, start_time)

    def _flush(self) -> list[int]:
        """The counts since the last flush, summed over processes, added to the totals."""
        window = self._window
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        window = window.cpu()
        self._total += window
        self._window = torch.zeros_like(self._window)
        self._window_start = self.state.global_step
        return window.tolist()


def generation_eval_for(
    model_args: ModelArguments, data_args: DataArguments, training_args, tokenizer, attention: str
):
    """--predict_with_generate with --eval_file: a function scoring greedy answers to the eval records' last
    assistant turns (every record, whatever the batch size), rendered as in training."""
    if not (training_args.predict_with_generate and data_args.eval_file):
        return None
    records = load_conversations(data_args.eval_file, data_args.train_format, log=lambda _msg: None).records
    chat = model_args.template is not None or any(not c.raw for _, _, c in records)
    template = get_template(model_args.template, tokenizer) if chat else None
    max_new_tokens = training_args.generation_max_length or 128

    def scores(model) -> dict[str, float]:
        with generating(model, attention):
            return generation_scores(
                model, tokenizer, template, records, max_new_tokens, training_args.per_device_eval_batch_size
            )

    return scores


def add_sample_answers(trainer, samples, model_args, training_args, tokenizer, attention: str, log) -> None:
    """--sample_prompts: the SampleAnswers callback, writing to the Trainer's TensorBoard when it has one."""
    if zero3_enabled():
        log("--sample_prompts: skipped under DeepSpeed ZeRO-3 (the weights are split over the processes)")
        return
    chat = model_args.template is not None or any(not conv.raw for conv, _ in samples)
    template = get_template(model_args.template, tokenizer) if chat else None
    callback = SampleAnswers(
        samples, tokenizer, template, attention, training_args.sample_max_new_tokens, log
    )

    def tensorboard():
        found = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
        return getattr(found[0], "tb_writer", None) if found else None

    callback.tensorboard = tensorboard
    trainer.add_callback(callback)
    log(f"--sample_prompts: {len(samples)} prompt(s) answered at every evaluation and save and at the end")


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


class StepGroupedSampler(LengthGroupedSampler):
    """The Trainer's length grouping, with two changes that keep a run the same however it is split or resumed:
    groups of whole optimizer steps of all processes (batch x accumulation x processes), so every split of a step
    batches the same examples together; and an order drawn from (seed, epoch) alone, so a resumed run redraws
    the interrupted epoch's order exactly (the Trainer's draws from the global random state, which is elsewhere
    by then)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def is_prefix_tuning(model) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING")


class SaveRunArgs(TrainerCallback):
    """Every checkpoint gets the run's arguments beside the weights and tokenizer, and a full model's config
    says use_cache true again (it is off only while training), so the checkpoint generates at full speed."""

    def __init__(self, run_args: dict) -> None:
        self.run_args = run_args

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_run_args(folder, self.run_args)
            config = folder / "config.json"
            if config.exists():
                saved = json.loads(config.read_text())
                config.write_text(json.dumps(saved | {"use_cache": True}, indent=2, sort_keys=True) + "\n")


def write_run_args(folder: Path, run_args: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, ensure_ascii=False, default=str))


def resolve_resume(training_args: TrainArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume == "auto":
        last = last_complete_checkpoint(training_args.output_dir)
        print(f"resuming from {last}" if last else "no checkpoint to resume from: starting fresh")
        return last
    if resume and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return resume


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N folder the Trainer finished writing (trainer_state.json is its last file); a run
    killed while saving leaves a newer one without it, which is skipped with a word."""
    folder = Path(output_dir)
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in (folder.glob("checkpoint-*") if folder.is_dir() else [])
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"{path} is incomplete (no trainer_state.json): skipped")
    return None


def main(argv: list[str] | None = None) -> int:
    if requested_stage(list(sys.argv[1:] if argv is None else argv)) in PREFERENCE_STAGES:
        from chatft.preference.train import main as preference_main

        return preference_main(argv)
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = start_process(training_args)
    try:
        tokenizer = load_tokenizer(model_args)
        samples = read_sample_prompts(training_args.sample_prompts) if training_args.sample_prompts else None
        with training_args.main_process_first(desc="preprocessing"):
            train = load_split("train", data_args.train_file, data_args, model_args, tokenizer, log)
            evaluation = (
                load_split("eval", data_args.eval_file, data_args, model_args, tokenizer, log)
                if data_args.eval_file
                else None
            )
    except (DataFileError, TemplateError, ValueError) as e:  # InferError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    refusal = data_refused(data_args, train, evaluation)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    packing = resolve_packing(model_args, data_args, log)
    packed_train = (
        PackedDataset(train.dataset, data_args.max_seq_length, train.stats.lengths) if packing else None
    )
    if packed_train is not None:
        packed_step(packed_train, data_args, training_args, log)
    log(f"precision: {training_args.precision} ({training_args.precision_why})")
    plan_micro_batches(model_args, data_args, training_args, log)
    if evaluation is not None and training_args.eval_strategy == "no":
        training_args.eval_strategy = "steps"
        training_args.eval_steps = training_args.eval_steps or training_args.save_steps
        log(f"--eval_file given: evaluating every {training_args.eval_steps} steps")

    set_seed(training_args.seed)  # before the model is built: LoRA and prefix weights are random
    try:
        resume = resolve_resume(training_args)
        model = load_model(model_args, training_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = position_warning(base_model(model).config, data_args.max_seq_length, train.stats.lengths)
    if warning:
        log(warning)
    run_args = {
        "model": dataclasses.asdict(model_args),
        # closing_tokens: the ends of turn the data trained, where inference stops too
        "data": dataclasses.asdict(data_args)
        | {"formats": train.formats, "closing_tokens": train.stats.closing_tokens},
        "training": training_args.to_dict(),
    }
    train_set, eval_set = training_datasets(train, evaluation, packed_train, data_args, training_args, log)
    own = attn = base_model(model).config._attn_implementation  # as loaded: the model's choice or the user's
    if packing:
        attn = packed_attention(model, own, log, torch.cuda.is_available() and not training_args.use_cpu)
        collator = PackedCollator.for_backend(tokenizer.pad_token_id, attn)
        if training_args.device.type == "cpu":
            collator.pad_to_multiple_of = train_set.longest_row
            log(
                f"packing: rows padded to {train_set.longest_row} tokens (the longest row) on the CPU: one shape "
                "for every forward, where each new shape costs oneDNN kernels and memory of its own"
            )
    else:
        collator = PadCollator(tokenizer.pad_token_id)
    trainer = ChatTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[SaveRunArgs(run_args)],
        chunked_loss=training_args.chunked_loss,
        loss_chunk_size=training_args.loss_chunk_size,
        generation_eval=generation_eval_for(model_args, data_args, training_args, tokenizer, own),
    )
    release_memory(trainer, training_args, log)
    if samples:
        add_sample_answers(trainer, samples, model_args, training_args, tokenizer, own, log)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except PackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.config.use_cache = True  # off for training only; the saved model generates with its cache
    if attn != own:  # packing's own sdpa; config.json never records the attention
        base_model(model).set_attn_implementation(own)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_args(Path(training_args.output_dir), run_args)
        trainer.save_state()
        png = plot_loss(trainer.state.log_history, Path(training_args.output_dir))
        log(f"model saved to {training_args.output_dir}" + (f"; loss curve: {png}" if png else ""))
    return 0
