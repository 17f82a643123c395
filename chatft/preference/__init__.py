"""Preference tuning after SFT (finetune.py --stage dpo|orpo|simpo|kto): formats.py reads the records, encode.py
turns them into ids with SFT's exact rendering and labels, train.py runs TRL's trainers on them."""

from __future__ import annotations

import yaml


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
