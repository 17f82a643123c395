#!/usr/bin/env python
"""Format ToolAlpaca's API entries as multi-turn JSON lines with tools; see --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.formatters import format_tool_alpaca_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(format_tool_alpaca_main())
