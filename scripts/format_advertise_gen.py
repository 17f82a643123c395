#!/usr/bin/env python
"""Format AdvertiseGen ({content, summary} lines) as input-output JSON lines; see --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.data.formatters import format_advertise_gen_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(format_advertise_gen_main())
