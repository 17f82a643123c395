"""Checkpoints: the run's arguments beside every checkpoint and the final model, the checkpoint a run resumes
from, and the end of a run (model, state and loss curve saved by the main process)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from chatft.args import RUN_ARGS_FILE
from chatft.training.plot import plot_loss


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


def resolve_resume(training_args) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume == "auto":
        last = last_complete_checkpoint(training_args.output_dir)
        print(f"resuming from {last}" if last else "no checkpoint to resume from: starting fresh")
        return last
    if resume and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return resume


def last_complete_checkpoint(output_dir: str, say: Callable[[str], None] = print) -> str | None:
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
        say(f"{path} is incomplete (no trainer_state.json): skipped")
    return None


def resumed_precision(training_args) -> tuple[str, str] | None:
    """(precision, checkpoint) of the checkpoint this run resumes from, as its run_args.json says it trained, or
    None (no resume, no checkpoint yet, or nothing said)."""
    resume = training_args.resume_from_checkpoint
    if resume == "auto":
        resume = last_complete_checkpoint(training_args.output_dir, say=lambda _msg: None)
    if not resume:
        return None
    try:
        run_args = json.loads((Path(resume) / RUN_ARGS_FILE).read_text(encoding="utf-8"))
        precision = run_args["training"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (precision, resume) if precision in ("fp32", "bf16", "fp16") else None


def save_run(trainer, training_args, run_args: dict, log: Callable[[str], None]) -> None:
    """The trained model (or adapter) in output_dir; from the main process, the run's arguments, the Trainer's
    state and the loss curve beside it."""
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_args(Path(training_args.output_dir), run_args)
        trainer.save_state()
        png = plot_loss(trainer.state.log_history, Path(training_args.output_dir))
        log(f"model saved to {training_args.output_dir}" + (f"; loss curve: {png}" if png else ""))
