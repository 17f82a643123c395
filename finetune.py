#!/usr/bin/env python
"""Fine-tune a chat model: full (DeepSpeed ZeRO-2/3), P-Tuning v2, LoRA or QLoRA. See --help and the README."""

import sys

from chatft.train import main

if __name__ == "__main__":
    sys.exit(main())
