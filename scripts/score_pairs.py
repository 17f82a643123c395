#!/usr/bin/env python
"""How a model ranks the replies of preference pairs (preference accuracy; with a reference, DPO's rewards)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.preference.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
