#!/usr/bin/env python
"""Shuffle and split a data file into train and test files, optionally de-duplicating prompts; see --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.convert import split_data_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(split_data_main())
