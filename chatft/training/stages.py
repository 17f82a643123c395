"""finetune.py's dispatch: the stage a command line asks for (--stage, or its --config's stage) runs its own
module. A stage module composes the rooms of chatft.training; nothing in them imports a stage."""

from __future__ import annotations

import importlib
import sys

from chatft.training.command_line import requested_stage

# stage -> the module whose main(argv) runs it
STAGE_MODULES = {
    "sft": "chatft.training.sft",
    "dpo": "chatft.training.preference",
    "orpo": "chatft.training.preference",
    "simpo": "chatft.training.preference",
    "kto": "chatft.training.preference",
    "grpo": "chatft.training.grpo",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # an unknown stage goes to SFT's parser, which names the stages it knows
    module = STAGE_MODULES.get(requested_stage(argv), STAGE_MODULES["sft"])
    return importlib.import_module(module).main(argv)
