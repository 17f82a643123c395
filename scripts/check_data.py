#!/usr/bin/env python
"""Validate training data and print the Sanity Check, statistics and every invalid record (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
