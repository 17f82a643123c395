"""finetune.py's library side: arguments, data, model, Trainer, saving.

Defaults that differ from transformers' TrainingArguments (everything else is the Trainer's own):
- output_dir "output/finetune", logging_steps 10, save_steps 100, remove_unused_columns False (our datasets
  hold only what the model takes), report_to none unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from chatft.args import DataArguments, ModelArguments
from chatft.collator import PadCollator
from chatft.data.check import report_lines
from chatft.data.dataset import PreparedData, prepare_data
from chatft.data.formats import DataFileError
from chatft.data.templates import TemplateError
from chatft.methods import load_model, load_tokenizer
from chatft.plot import plot_loss

RUN_ARGS_FILE = "run_args.json"


@dataclass
class TrainArguments(Seq2SeqTrainingArguments):
    output_dir: str = field(default="output/finetune", metadata={"help": "Where checkpoints and the model go."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_steps: float = field(default=100, metadata={"help": "Save a checkpoint every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: datasets hold model inputs."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainArguments))


def yaml_to_argv(path: str) -> list[str]:
    """A run.yaml's keys as command-line arguments, so that the real command line (which comes after) wins."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    argv: list[str] = []
    for key, value in config.items():
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file")
        argv = yaml_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2 :]
    model_args, data_args, training_args = make_parser().parse_args_into_dataclasses(args=cpu_distributed(argv))
    if not data_args.train_file:
        raise ValueError("--train_file is required (one or more .json/.jsonl files or directories)")
    return model_args, data_args, training_args


def load_split(name: str, files: list[str], data_args: DataArguments, model_args: ModelArguments, tokenizer, log):
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
    )
    for line in report_lines(prepared, tokenizer):
        log(line)
    return prepared


def data_refused(prepared: PreparedData, data_args: DataArguments) -> str | None:
    if prepared.problems and not data_args.skip_invalid_records:
        return (
            f"{len(prepared.problems)} invalid record(s), listed above; fix them, or pass --skip_invalid_records "
            "to train without them"
        )
    if prepared.problems:
        print(f"skipping {len(prepared.problems)} invalid record(s) (--skip_invalid_records)")
    if len(prepared.dataset) == 0:
        return "no example left to train on"
    return None


class SaveRunArgs(TrainerCallback):
    """Every checkpoint gets the run's arguments beside the weights and tokenizer."""

    def __init__(self, run_args: dict) -> None:
        self.run_args = run_args

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_run_args(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.run_args)


def write_run_args(folder: Path, run_args: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, ensure_ascii=False, default=str))


def resolve_resume(training_args: TrainArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume == "auto":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        print(f"resuming from {last}" if last else "no checkpoint to resume from: starting fresh")
        return last
    if resume and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return resume


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_main = training_args.process_index == 0
    log = print if is_main else (lambda _msg: None)
    try:
        tokenizer = load_tokenizer(model_args)
        with training_args.main_process_first(desc="preprocessing"):
            train = load_split("train", data_args.train_file, data_args, model_args, tokenizer, log)
            evaluation = (
                load_split("eval", data_args.eval_file, data_args, model_args, tokenizer, log)
                if data_args.eval_file
                else None
            )
    except (DataFileError, TemplateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prepared in (train, evaluation):
        refusal = prepared and data_refused(prepared, data_args)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 1
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
    run_args = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": training_args.to_dict(),
    }
    columns = ["input_ids", "labels"]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train.dataset.select_columns(columns),
        eval_dataset=evaluation.dataset.select_columns(columns) if evaluation else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[SaveRunArgs(run_args)],
    )
    trainer.train(resume_from_checkpoint=resume)
    model.config.use_cache = True  # off for training only; the saved model generates with its cache
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_args(Path(training_args.output_dir), run_args)
        trainer.save_state()
        png = plot_loss(trainer.state.log_history, Path(training_args.output_dir))
        log(f"model saved to {training_args.output_dir}" + (f"; loss curve: {png}" if png else ""))
    return 0
