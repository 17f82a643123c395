"""What every part of inference shares: the one-line error and where notes go."""

from __future__ import annotations

import sys


class InferError(ValueError):
    """Bad input, explained in one line (main prints `error: <it>` and exits 2)."""


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    """The most telling line of an error: a 'size mismatch' line when there is one, else the first."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line:
            return line
    return lines[0] if lines else type(error).__name__
