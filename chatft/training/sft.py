"""The SFT stage (finetune.py, --stage sft): conversations in, a trained model (or adapter) out. It composes the
rooms of chatft.training in the order a run takes: arguments, process, data, step plan, model, Trainer, save."""

from __future__ import annotations

import dataclasses
import math

import torch

from chatft import inductor
from chatft.collator import PackedCollator, PadCollator
from chatft.data.check import report_lines
from chatft.methods import load_model, load_tokenizer
from chatft.packing import PackedDataset, PackingError
from chatft.training.checkpoints import SaveRunArgs, save_run
from chatft.training.command_line import parse_args
from chatft.training.data import prepare_sft, training_datasets
from chatft.training.flow import (
    StageError,
    bad_input_stops,
    load_sets,
    run_stage,
    seeded_model,
    warn_positions,
)
from chatft.training.process import add_process_callbacks, start_process
from chatft.training.samples import add_sample_answers, base_model, generation_eval_for, read_sample_prompts
from chatft.training.step_plan import (
    cpu_batch_padding,
    cpu_row_padding,
    packed_step,
    plan_micro_batches,
    resolve_packing,
    schedule_evaluation,
)
from chatft.training.stream import (
    StreamError,
    add_stream_state,
    check_streaming_arguments,
    open_training_stream,
)
from chatft.training.time_budget import add_time_budget, parse_duration
from chatft.training.trainer import ChatTrainer, packed_attention


def compile_if_it_pays(model, model_args, training_args, train_set, log) -> bool:
    """--compile_layers: the decoder layers compiled (chatft.inductor), where asked or where auto finds the run long
    enough; returns whether the loss is compiled too."""
    steps = training_args.max_steps if training_args.max_steps > 0 else None
    if steps is None and hasattr(train_set, "__len__"):
        rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        steps = math.ceil(len(train_set) / (rows * max(1, training_args.world_size))) * math.ceil(
            training_args.num_train_epochs
        )
    run = inductor.CompileSetting(
        device=training_args.device.type,
        method=model_args.method,
        fused_lora=model_args.fused_lora,
        deepspeed=bool(training_args.deepspeed),
        checkpointing=bool(training_args.gradient_checkpointing),
        whole_model=bool(training_args.torch_compile),
        steps=steps,
        budget_s=parse_duration(training_args.time_budget) if training_args.time_budget else None,
        compiler=inductor.cpp_compiler(),
    )
    with bad_input_stops():
        on, why = inductor.choose(training_args.compile_layers, run)
    if not on:
        log(f"compile: off ({why})")
        return False
    if training_args.compile_layers is None:
        torch._dynamo.config.suppress_errors = True  # auto: what fails to compile runs eagerly instead
    layers = inductor.compile_layers(model)
    log(
        f"compile: {layers} decoder layers (all but the first) and the loss, by TorchInductor with dynamic shapes "
        f"({why}); the first step includes the compile"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    return run_stage(lambda: run_sft(argv))


def run_sft(argv: list[str] | None) -> int:
    with bad_input_stops():
        model_args, data_args, training_args = parse_args(argv)
    log = start_process(training_args)
    with bad_input_stops():
        tokenizer = load_tokenizer(model_args)
        samples = read_sample_prompts(training_args.sample_prompts) if training_args.sample_prompts else None
    if data_args.streaming:
        with bad_input_stops():
            check_streaming_arguments(data_args, training_args)
        packing = resolve_packing(model_args, data_args, log)
        with bad_input_stops():
            stream, formats, closing_tokens = open_training_stream(
                data_args, model_args, training_args, tokenizer, packing, log
            )
        lengths, evaluation, packed_train = [data_args.max_seq_length], None, None
    else:
        train, evaluation = load_sets(
            training_args,
            data_args,
            lambda files: prepare_sft(files, data_args, model_args, tokenizer, log),
            lambda prepared: report_lines(prepared, tokenizer),
            log,
        )
        formats, closing_tokens, lengths = train.formats, train.stats.closing_tokens, train.stats.lengths
        packing = resolve_packing(model_args, data_args, log)
        packed_train = (
            PackedDataset(train.dataset, data_args.max_seq_length, train.stats.lengths, train.folder)
            if packing
            else None
        )
        if packed_train is not None:
            packed_step(packed_train, data_args, training_args, log)
    log(f"precision: {training_args.precision} ({training_args.precision_why})")
    plan_micro_batches(model_args, data_args, training_args, log)
    schedule_evaluation(evaluation is not None, training_args, log)

    resume, model = seeded_model(training_args, lambda: load_model(model_args, training_args))
    warn_positions(model, data_args.max_seq_length, lengths, log)
    run_args = {
        "model": dataclasses.asdict(model_args),
        # closing_tokens: the ends of turn the data trained, where inference stops too
        "data": dataclasses.asdict(data_args) | {"formats": formats, "closing_tokens": closing_tokens},
        "training": training_args.to_dict(),
    }
    if data_args.streaming:
        train_set, eval_set = stream, None
    else:
        train_set, eval_set = training_datasets(
            train, evaluation, packed_train, data_args, training_args, log
        )
    own = attn = base_model(model).config._attn_implementation  # as loaded: the model's choice or the user's
    if packing:
        attn = packed_attention(model, own, log, torch.cuda.is_available() and not training_args.use_cpu)
        collator = PackedCollator.for_backend(tokenizer.pad_token_id, attn)
        if training_args.device.type == "cpu":
            if data_args.streaming:  # rows not known ahead: one shape
                width = data_args.max_seq_length
                shape = cpu_row_padding(width, 1, width)
            else:
                per_forward = training_args.per_device_train_batch_size if collator.flatten else 1
                shape = cpu_row_padding(
                    sum(train_set.lengths), train_set.packed_rows, train_set.longest_row, per_forward
                )
            collator.pad_to_multiple_of, why = shape
            log(f"packing: {why}")
    else:
        collator = PadCollator(tokenizer.pad_token_id, max_length=data_args.max_seq_length)
        if training_args.device.type == "cpu":
            collator.pad_to_multiple_of, why = cpu_batch_padding(data_args.max_seq_length)
            log(f"padding: {why}")
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
    if data_args.streaming:
        add_stream_state(trainer, stream, training_args, resume)
    add_process_callbacks(trainer, training_args, log)
    add_time_budget(trainer, training_args, resume, log)
    trainer.compiled_loss = compile_if_it_pays(model, model_args, training_args, train_set, log)
    if samples:
        add_sample_answers(trainer, samples, model_args, data_args, training_args, tokenizer, own, log)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except PackingError as e:
        raise StageError(str(e), 1) from e
    except StreamError as e:
        raise StageError(str(e), 2) from e
    model.config.use_cache = True  # off for training only; the saved model generates with its cache
    if attn != own:  # packing's own sdpa; config.json never records the attention
        base_model(model).set_attn_implementation(own)
    save_run(trainer, training_args, run_args, log)
    return 0
