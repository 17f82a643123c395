#!/usr/bin/env python
"""The reward functions of --stage grpo applied to inference.py's predictions (held-out rewards before/after)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.grpo.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
