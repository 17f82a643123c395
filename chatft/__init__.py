"""chatft: fine-tune chat language models on conversation data, with exact chat-template labels."""

import logging
import os

# Offline: a model is a local folder and nothing is fetched from a model or dataset hub at run time. Set in the
# package so that it holds before transformers, huggingface_hub or datasets read it; HF_HUB_OFFLINE=0 in the
# environment allows downloads again.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# Warnings that libraries log on import, before anything of the user's is run, and that ask nothing of the user:
# transformers' trainer imports peft, which imports bitsandbytes, whose CPU backend on an AVX512-BF16 CPU looks
# for optional 4-bit kernels on a hub (which chatft never reaches: it stays offline); DeepSpeed, imported by the
# Trainer when installed, says it found no GPU. Each stays silenced only for its one message.
_IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


for _logger, _prefix in _IMPORT_NOISE.items():
    logging.getLogger(_logger).addFilter(_DropMessage(_prefix))

__version__ = "0.1.0"
