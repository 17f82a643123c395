"""Export a model folder, a LoRA/QLoRA adapter or a base model to a verified GGUF (+ Ollama Modelfile).

python scripts/export_gguf.py SOURCE OUT.gguf [--type f32|f16|bf16|q8_0] [--base BASE]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatft.export.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
