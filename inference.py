#!/usr/bin/env python
"""Chat with, predict and evaluate with a base model or a fine-tuned checkpoint (see --help and chatft/infer.py)."""

import sys

from chatft.infer import main

if __name__ == "__main__":
    sys.exit(main())
