#!/usr/bin/env python
"""Convert training data between formats (alpaca, sharegpt, openai, multi-turn, input-output); see --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.convert import convert_data_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_data_main())
