#!/usr/bin/env python
"""Fine-tune a chat model: full (DeepSpeed ZeRO-2/3), P-Tuning v2, LoRA or QLoRA; --stage sft (the default) or a
preference stage (dpo, orpo, simpo, kto). See --help and docs/training.md."""

import sys

from chatft.training.stages import main

if __name__ == "__main__":
    sys.exit(main())
