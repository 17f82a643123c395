"""The step plan: how many examples or packed rows a step holds, how a step is split into forward passes
(micro-batches, chatft.machine), activation checkpointing, what DeepSpeed is told, and when evaluation runs."""

from __future__ import annotations

import torch

from chatft.args import DataArguments, ModelArguments
from chatft.machine import Shape, plan_step
from chatft.packing import PackedDataset, rows_per_process


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


# On the CPU packed rows are padded to few shapes: each new shape costs oneDNN kernels and memory of its own
# (bench/RESULTS.md, how the memory came under the peer's). One shape, the longest row, while rows are nearly full;
# where padding to it would be more than a tenth of the tokens (examples so long that a row holds little more than
# one: AdvertiseGen's rows were 73% full, and one shape cost a fifth of the speed), multiples of SHAPE_STEP tokens.
FULL_ROWS = 0.9
SHAPE_STEP = 64


def cpu_row_padding(tokens: int, rows: int, longest: int, per_forward: int = 1) -> tuple[int, str]:
    """What packed rows are padded to a multiple of on the CPU, and why (for the log): tokens over rows rows whose
    longest holds `longest` tokens, per_forward of them flattened into one row a forward (PackedCollator.flatten)."""
    fill = tokens / (rows * longest) if rows else 1.0
    if fill >= FULL_ROWS or longest <= SHAPE_STEP:
        return longest, (
            f"rows padded to {longest} tokens (the longest row) on the CPU: one shape for every forward, where each "
            "new shape costs oneDNN kernels and memory of its own"
        )
    return SHAPE_STEP, (
        f"rows padded to a multiple of {SHAPE_STEP} tokens on the CPU (at most {-(-per_forward * longest // SHAPE_STEP)} "
        "shapes): "
        f"padded to the longest row ({longest}) they would be {100 * (1 - fill):.0f}% padding"
    )


def cpu_batch_padding(max_length: int) -> tuple[int, str]:
    """What padded (unpacked) batches are padded to a multiple of on the CPU, and why (for the log): each batch's
    longest example varies, and each new length would cost its bf16 kernels and memory of their own."""
    return SHAPE_STEP, (
        f"batches padded to a multiple of {SHAPE_STEP} tokens on the CPU (at most {-(-max_length // SHAPE_STEP)} "
        "shapes, where each new shape costs oneDNN kernels and memory of its own)"
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


def schedule_evaluation(has_eval_set: bool, training_args, log) -> None:
    """An eval file given with no evaluation strategy: evaluate every eval_steps (or save_steps) steps."""
    if has_eval_set and training_args.eval_strategy == "no":
        training_args.eval_strategy = "steps"
        training_args.eval_steps = training_args.eval_steps or training_args.save_steps
        log(f"--eval_file given: evaluating every {training_args.eval_steps} steps")
