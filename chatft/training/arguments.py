"""The training arguments: the Trainer's, with chatft's defaults and additions.

Defaults that differ from transformers' TrainingArguments (everything else is the Trainer's own):
- output_dir "output/finetune", logging_steps 10, save_steps 100, remove_unused_columns False (our datasets
  hold only what the model takes), report_to none unless asked.
- prediction_loss_only True: evaluation computes the loss only (no logits gathered over the eval set).
- Added: malloc_mmap_threshold (off by default; 1048576 trades 26-41% of the CPU speed for 0.4-0.7x the peak RSS),
  malloc_trim (auto: on for CPU training; freed memory goes back to the system when the heap grows more than
  10% past what a micro-batch needs).
- Added: chunked_loss True / loss_chunk_size (chatft.loss: the loss at trained positions only, LM head in
  chunks), group_by_length True (padded batches only: examples of similar length batched together).
- Added: precision auto (bf16 autocast where the machine has bf16 instructions, chatft.machine), micro_batch_size
  and max_memory (a step split into micro-batches from the memory they need; chatft.machine.plan_step).
- activation_checkpointing: unset means "auto": on only where one micro-batch of one row does not fit the memory
  budget (chatft.machine.plan_step); never for ptuning.
- --packing (DataArguments): unset means on for full / lora / qlora, off for ptuning (which cannot pack).
  With packing, per_device_train_batch_size still counts examples (--packed_batch_unit examples): a step's
  examples are turned into whole packed rows of up to max_seq_length tokens (packed_step); the log shows
  examples_per_step, tokens_per_step and trained_tokens_per_step so that packed and padded runs compare. On the
  CPU every row is padded to the longest row's length (one shape for oneDNN; the padding is a segment of its own),
  or to a multiple of 64 tokens where one shape would be more than a tenth padding (step_plan.cpu_row_padding).
Why these defaults: bench/RESULTS.md (measured on this project's CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from chatft.args import DataArguments, ModelArguments
from chatft.loss import DEFAULT_CHUNK_SIZE
from chatft.machine import PRECISIONS
from chatft.training.time_budget import parse_duration


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
            "help": "Less memory for 5-36%% more time per step. Unset: on only where a step would not fit "
            "comfortably in the memory available (never for ptuning).",
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
            "help": "The loss only at trained positions, the LM head in chunks (no full-vocabulary logits of the "
            "batch); False: the model's own."
        },
    )
    loss_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "Trained positions per LM-head chunk (--chunked_loss)."}
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata={
            "help": "Linux (glibc), to save memory: blocks of at least this many bytes (tensors) get their own "
            "memory map and go back to the system when freed, e.g. 1048576 (glibc's default threshold grows, and "
            "the heap fragments): at 1 MiB with checkpointing, 0.42x (LoRA) / 0.73x (full) the peak RSS at 0.59x "
            "/ 0.74x the speed (bench/RESULTS.md). 0: glibc's default. Ignored where MALLOC_MMAP_THRESHOLD_ is set."
        },
    )
    malloc_trim: bool | None = field(
        default=None,
        metadata={
            "help": "Linux (glibc): freed memory back to the system (malloc_trim) after a micro-batch once the "
            "process is 10%% past what a micro-batch needs. Unset: on when training on the CPU."
        },
    )
    sample_prompts: str | None = field(
        default=None,
        metadata={
            "help": "A few prompts (a .txt file, one per line, or a data file in any training format: each "
            "record's conversation up to its last answer) answered greedily at every evaluation and save and at "
            "the end, printed and written to OUTPUT_DIR/samples.jsonl (and TensorBoard when it is on); in "
            "--stage grpo, num_generations sampled rollouts each, scored by the reward functions."
        },
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "--sample_prompts: longest sample answer in tokens."}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 autocast (fp32 master weights) on a GPU that supports it or a CPU with bf16 "
            "instructions (AMX-BF16, AVX512-BF16, Arm BF16; where the CPU's flags cannot be read, a probe kept per "
            "machine), else fp32 (fp16 on a GPU without bf16); a resumed run keeps the precision it started in. "
            "Or fp32, bf16, fp16. --bf16 / --fp16 also decide.",
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
    time_budget: str | None = field(
        default=None,
        metadata={
            "help": "Train for this long (90s, 20m, 1.5h, 1h30m) instead of a step count: the first steps are "
            "timed, the step count set so that training, evaluations and saves end within it, and the "
            "learning-rate schedule laid over that count; a resumed run keeps the count. --max_steps caps it."
        },
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads torch uses. Unset: the cores this process may use (affinity, CPU quota, shared by "
            "the processes of a torchrun), fewer while other work keeps cores busy, more again when it leaves "
            "(each change logged)."
        },
    )
    compile_layers: bool | None = field(
        default=None,
        metadata={
            "help": "TorchInductor for the decoder layers and the loss. Unset: on for CPU LoRA runs of 300+ "
            "steps or a 10m+ --time_budget.",
            "nargs": "?",
            "const": True,
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
        if self.time_budget is not None:
            parse_duration(self.time_budget)  # a usage error now, not after the model has loaded
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, not {self.threads}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"--max_memory must be a positive number of GiB, not {self.max_memory}")
        if self.precision == "fp32" and (self.bf16 or self.fp16):
            raise ValueError("--precision fp32 contradicts --bf16 / --fp16")
        super().__post_init__()


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainArguments))


def with_trl_config(name: str, config: type, module: str, defaults: dict | None = None) -> type:
    """TrainArguments and a TRL config in one dataclass named `name`: every TRL knob on the command line, chatft's
    arguments and defaults where the two differ (precision decided by --precision, bf16 off unless chosen), then
    `defaults` (a config field's name -> chatft's default, with the field's own help). module: where the class is
    found again by name (the Trainer pickles its arguments; that module's __getattr__ builds it)."""
    overrides = {
        "bf16": (
            bool | None,
            field(default=False, metadata={"help": "bf16 mixed precision (default: off)."}),
        ),
        "gradient_checkpointing": (bool | None, field(default=None, metadata={"help": "Deprecated alias."})),
    }
    for key, value in (defaults or {}).items():
        own = next(f for f in dataclasses.fields(config) if f.name == key)
        overrides[key] = (own.type, field(default=value, metadata=own.metadata))
    cls = dataclasses.make_dataclass(
        name, [(key, kind, spec) for key, (kind, spec) in overrides.items()], bases=(TrainArguments, config)
    )
    cls.__module__ = module
    return cls
