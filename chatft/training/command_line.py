"""finetune.py's command line: --config run.yaml under the command line, a short --help, the stage asked for,
the CPU-distributed setup, and the precision chosen once the arguments are known."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import yaml
from transformers import HfArgumentParser

from chatft.args import DataArguments, ModelArguments
from chatft.machine import Shape, choose_precision, precision_flags
from chatft.training.arguments import make_parser
from chatft.training.checkpoints import resumed_precision

# --help shows chatft's own arguments and these Trainer arguments, grouped; --help_all shows every one
HELP_GROUPS = {
    "steps and batches": ["output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                          "num_train_epochs", "time_budget"],
    "optimization": ["learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim"],
    "logging, saving, evaluation": ["logging_steps", "save_steps", "save_total_limit", "eval_strategy", "eval_steps",
                                    "per_device_eval_batch_size", "predict_with_generate", "generation_max_length",
                                    "sample_prompts", "sample_max_new_tokens", "report_to"],
    "precision and memory": ["bf16", "fp16", "use_cpu", "activation_checkpointing", "chunked_loss",
                             "malloc_mmap_threshold", "malloc_trim", "threads", "compile_layers", "deepspeed"],
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


def requested_stage(argv: list[str]) -> str:
    """The --stage of a finetune.py command line (--stage X, --stage=X, else --config's stage), sft by default.
    Anything unreadable is left to the argument parser to report."""
    stage = None
    for i, arg in enumerate(argv):
        if arg == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
        elif arg.startswith("--stage="):
            stage = arg.split("=", 1)[1]
    if stage is not None:
        return stage
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                return "sft"
            return str(config.get("stage", "sft")) if isinstance(config, dict) else "sft"
    return "sft"


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
    kept = resumed_precision(training_args) if training_args.precision == "auto" else None
    if given:
        precision, why = given, f"--{given}"
    else:
        if kept:  # a result must not depend on which precision the machine would choose today
            precision, why = kept[0], f"auto: as the run resumed from {kept[1]} was trained"
        else:
            shape = Shape.of(model_args.model_name_or_path)
            precision, why = choose_precision(
                training_args.precision, shape, cuda, bool(training_args.deepspeed)
            )
        flags = precision_flags(precision, cuda)
        if flags:  # the Trainer sets up its precision (and the CPU device) while it parses
            parsed = parser.parse_args_into_dataclasses(args=[*argv, *flags])
            training_args = parsed[-1]
    training_args.precision, training_args.precision_why = precision, why
    return parsed
