"""chatft: fine-tune chat language models on conversation data, with exact chat-template labels."""

import os

# Offline: a model is a local folder and nothing is fetched from a model or dataset hub at run time. Set in the
# package so that it holds before transformers, huggingface_hub or datasets read it; HF_HUB_OFFLINE=0 in the
# environment allows downloads again.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

__version__ = "0.1.0"
