"""Export a trained model to other runtimes: GGUF for llama.cpp / Ollama / LM Studio (gguf.py), with an Ollama
Modelfile (modelfile.py); command.py is scripts/export_gguf.py."""

from collections.abc import Sequence


def first_difference(a: Sequence, b: Sequence) -> int:
    """The first index where a and b differ (the shorter length when one starts the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
