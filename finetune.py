#!/usr/bin/env python
"""Fine-tune a chat model: full (DeepSpeed ZeRO-2/3), P-Tuning v2, LoRA or QLoRA; --stage sft (the default) or a
preference stage (dpo, orpo, simpo, kto). See --help and docs/training.md."""

import sys

from chatft.lean_imports import leave_out_bitsandbytes

leave_out_bitsandbytes(sys.argv[1:])  # before transformers and peft load: a second less to start

from chatft.training.stages import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
