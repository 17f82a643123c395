"""Toy tokenizers built in-process, with ids that can be worked out by hand.

Words and white-space runs are single tokens (a word-level model over a regex split), so "\\n  " after a
header is ONE token, the way real BPE tokenizers merge a newline with the spaces after it.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[gMASK]", "sop",
            "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]  # fmt: skip
WORDS = ["\n", "\n\n", " ", "  ", "\n  ", "system", "user", "assistant", "tool", "hi", "hello", "there", "how",
         "are", "you", "fine", "thanks", "bye", "ok", "weather", "Paris", "sunny", "?", "!", ".", ",", "{", "}",
         ":", '"', "[", "]", "(", ")", "=", "'", "<", ">", "/", "_", "-", "name", "arguments", "city", "call",
         "response", "python", "`", "get", "question", "answer"]  # fmt: skip

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + WORDS)}


def make_tokenizer(chat_template: str | None = CHATML, bos: bool = False) -> PreTrainedTokenizerFast:
    """eos = </s> (2) unless the template is ChatML, where it is <|im_end|> (4), as SmolLM2 has it."""
    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    split = Regex(r"\s+|\w+|[^\w\s]")
    tok.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    eos = "<|im_end|>" if chat_template == CHATML else "</s>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=eos, pad_token=eos
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIALS if t not in ("<unk>", "<s>", eos)]}
    )
    fast.chat_template = chat_template
    return fast


def ids(*tokens: str) -> list[int]:
    v = vocab()
    return [v[t] for t in tokens]
