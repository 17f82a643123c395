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


CHATS = [
    [("user", "hi"), ("assistant", "hello there")],
    [("user", "how are you?"), ("assistant", "fine, thanks!")],
    [("user", "weather?"), ("assistant", "sunny"), ("user", "bye"), ("assistant", "bye!")],
    [("system", "ok"), ("user", "hi there"), ("assistant", "hello, how are you?")],
    [("user", "question?"), ("assistant", "answer.")],
    [("user", "Paris weather?"), ("assistant", "sunny in Paris.")],
    [("user", "hello"), ("assistant", "hi! how are you?"), ("user", "fine"), ("assistant", "ok, bye")],
    [("user", "thanks"), ("assistant", "ok!")],
]


def openai_jsonl(chats: list) -> str:
    """The chats as OpenAI-messages JSON lines."""
    import json

    return "".join(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n" for chat in chats
    )


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, **config):
    """A small random Llama (4 heads, 2 key/value heads, tied embeddings unless config says otherwise): the same
    weights for the same shape and seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, **{"tie_word_embeddings": True, **config},
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(folder, hidden: int = 64, layers: int = 2, seed: int = 0, **config):
    """tiny_llama sized for the toy tokenizer, saved with it in folder (returned)."""
    tok = make_tokenizer()
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    tiny_llama(len(tok), hidden, layers, seed, **ids, **config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges, as SmolLM2/Qwen/Llama-3 encode text: every byte is one token, so one CJK
    character is three; ChatML, eos = pad = <|im_end|>."""
    from tokenizers import decoders

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(SPECIALS + alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in SPECIALS if t not in ("<unk>", "<s>")]})
    fast.chat_template = CHATML
    return fast


def save_byte_model(folder, chats=(), steps: int = 0, context: int = 512, seed: int = 0):
    """A tiny Llama on byte_tokenizer, trained (full, greedy-exact) for `steps` on `chats` (Conversations, their
    assistant turns learnt by heart), saved with its tokenizer in folder (returned). steps 0: random weights."""
    import torch

    from chatft.data.templates import encode, get_template

    tok = byte_tokenizer()
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = tiny_llama(len(tok), 64, 2, seed, max_position_embeddings=context, **ids)
    template = get_template(None, tok)
    examples = [encode(conv, tok, template) for conv in chats]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        for ex in examples:
            loss = model(
                input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]), use_cache=False
            ).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEXT_WORDS = ["hi", "hello", "there", "how", "are", "you", "fine", "thanks", "bye", "ok", "weather", "Paris",
              "sunny", "question", "answer", "city", "call", "response", "python", "get"]  # fmt: skip


def many_chats(n: int, seed: int = 0) -> list:
    """n chats of random words, 1-2 turns, answers of 1-12 words: lengths that vary, so packed rows and padded
    batches differ from each other and a set of them spans many rows, steps and an epoch boundary."""
    import random

    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        words = rng.choices(TEXT_WORDS, k=rng.randint(lo, hi))
        return " ".join(words) + rng.choice([".", "?", "!"])

    chats = []
    for _ in range(n):
        turns = []
        for _ in range(rng.choice([1, 1, 2])):
            turns += [("user", text(1, 5)), ("assistant", text(1, 12))]
        chats.append(turns)
    return chats
