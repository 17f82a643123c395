"""chatft: fine-tune chat language models on conversation data, with exact chat-template labels."""

__version__ = "0.1.0"
