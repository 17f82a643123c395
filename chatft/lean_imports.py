"""A library a run does not use, kept out of its start. transformers' Trainer imports peft, and peft imports
bitsandbytes when it is installed; bitsandbytes in turn loads torch's compiler, about 1.1 s of a finetune.py start
on a 2-core machine. It is used only to quantize (QLoRA, --quantization_bit, a pre-quantized model) and by its
optimizers (8-bit, paged, Lion, AdEMAMix, RMSprop). finetune.py leaves it out when nothing in the command line,
its --config file or the model's config.json names any of these; then peft and transformers see it as not
installed."""

from __future__ import annotations

import sys
from pathlib import Path

# lower-case words of anything that may use bitsandbytes: methods, options, optimizer names, a quantized config
BITSANDBYTES_WORDS = (
    "qlora",
    "quantiz",
    "bnb",
    "8bit",
    "4bit",
    "32bit",
    "paged",
    "lion",
    "ademamix",
    "rmsprop",
)


def _option_values(argv: list[str], name: str) -> list[str]:
    """The values of --name X and --name=X."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]


def needs_bitsandbytes(argv: list[str]) -> bool:
    """True when the command line, its --config file or its model's config.json names anything in
    BITSANDBYTES_WORDS (a file that cannot be read: True, it may)."""
    texts = [" ".join(argv)]
    files = [Path(p) for p in _option_values(argv, "--config")]
    files += [
        Path(p) / "config.json" for p in _option_values(argv, "--model_name_or_path") if Path(p).is_dir()
    ]
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return True
    return any(word in text.lower() for text in texts for word in BITSANDBYTES_WORDS)


def leave_out_bitsandbytes(argv: list[str]) -> bool:
    """Marks bitsandbytes as not importable for this process (sys.modules entry None) unless the run may need
    it or it is imported already; True when left out."""
    if "bitsandbytes" in sys.modules or needs_bitsandbytes(argv):
        return False
    sys.modules["bitsandbytes"] = None
    return True
