#!/usr/bin/env python
"""Merge a LoRA adapter into its base model: python scripts/merge_adapter.py BASE ADAPTER OUT (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.inference.merge import merge_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(merge_main())
