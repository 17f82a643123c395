#!/usr/bin/env python
"""Chat with, predict and evaluate with a base model or a fine-tuned checkpoint (see --help and chatft/inference/)."""

import sys

from chatft.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
