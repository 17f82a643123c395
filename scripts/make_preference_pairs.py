#!/usr/bin/env python
"""Preference pairs from inference.py predictions: chosen = the record's answer, rejected = the prediction."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.preference.pairs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
