"""Check a written GGUF before the export reports success: it loads back with transformers (`gguf_file=`), its
weights are the source's at the file's precision, its tokenizer and chat template give the source's ids on
rendered conversations, it carries the stop tokens, and its greedy answers equal the source model's.

"Exactly" has one meaning for every --type: the model transformers reads back must be, bit for bit, the source
model with each weight rounded the way the file stores it (for f32 that is the source itself), and its greedy
answers must equal that model's. How far rounding (f16, bf16) or quantizing (q8_0) moves the answers away from
the full-precision source is measured and reported, not failed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.data.schema import Conversation, Message
from chatft.export import first_difference
from chatft.export import source as src
from chatft.export.gguf import PRE_TOKENIZER_PROBE, Written, read_metadata, round_trip

# Rendered and tokenized by both tokenizers; the first user turns double as the greedy prompts.
SAMPLE_CHATS = [
    [("user", "只剩一个心脏了还能活吗？"), ("assistant", "能，人本来就只有一个心脏。")],
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("user", "为什么冬天的时候要穿厚衣服？"), ("assistant", "因为冷。"), ("user", "那夏天呢？"),
     ("assistant", "夏天热，穿薄一点。")],
    [("user", "Write a haiku about the sea."), ("assistant", "Waves fold into foam,\n  salt wind\tcarries gulls home —\n\nnight tide, 3 a.m.")],
    [("system", "You answer in one short sentence."), ("user", "How many legs does a spider have? 8 or 6?"),
     ("assistant", "A spider has 8 legs."), ("user", "And an ant 🐜?"), ("assistant", "Six.")],
    [("system", "你是一个乐于助人的助手。"), ("user", "用 Python 写一个函数，返回列表的和。"),
     ("assistant", "```python\ndef total(xs):\n    return sum(xs)\n```")],
]  # fmt: skip
PLAIN_TEXTS = [
    PRE_TOKENIZER_PROBE,
    "  leading spaces, trailing  \n\n",
    "数字 1234567 和 3.14159，emoji 🦙🚀",
    "a",
]


class VerifyError(ValueError):
    """The written file is not what was meant (explained in one line)."""


@dataclass
class Verification:
    lines: list[str] = field(default_factory=list)
    loaded: tuple[Any, Any] | None = None  # (model, tokenizer) read back from the file
    prompts: list[list[int]] = field(default_factory=list)  # the greedy prompts' ids
    answers: list[list[int]] = field(default_factory=list)  # the file's greedy answers to them


def sample_conversations(extra: list[Conversation] = ()) -> list[Conversation]:
    chats = [Conversation([Message(role, text) for role, text in chat]) for chat in SAMPLE_CHATS]
    return chats + list(extra)


def load_back(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # whatever the loader raises, the file does not load
        raise VerifyError(
            f"transformers cannot load the file back ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    return model.eval(), tokenizer


CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "head_dim")  # fmt: skip


def check_config(source: Any, loaded: Any) -> None:
    for key in CONFIG_KEYS:
        a, b = _config_value(source.config, key), _config_value(loaded.config, key)
        if a is not None and a != b and not (isinstance(a, float) and abs(a - b) <= 1e-6 * abs(a)):
            raise VerifyError(f"the model read back has {key} {b}, the source {a}")
    theta = src_theta(source.config), src_theta(loaded.config)
    if theta[0] != theta[1]:
        raise VerifyError(f"the model read back has rope_theta {theta[1]}, the source {theta[0]}")


def _config_value(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    if key == "head_dim" and value is None:  # a config may leave it to hidden_size / num_attention_heads
        return config.hidden_size // config.num_attention_heads
    return value


def src_theta(config: Any) -> Any:
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_theta") if isinstance(rope, dict) else getattr(config, "rope_theta", None)


def reference_model(source_model: Any, written: Written) -> tuple[Any, int]:
    """The source with every exported weight rounded as the file stores it (the source itself when nothing is
    rounded), and how many weights were rounded."""
    import torch

    state = source_model.state_dict()
    rounded = {
        name: torch.from_numpy(round_trip(state[name].float().numpy(), type_name))
        for name, (_, type_name) in written.tensors.items()
        if type_name != "F32"
    }
    if not rounded:
        return source_model, 0
    model = copy.deepcopy(source_model)
    with torch.no_grad():
        for name, tensor in rounded.items():
            model.get_parameter(name).copy_(tensor)
    return model.eval(), len(rounded)


def check_weights(reference: Any, loaded: Any, written: Written) -> None:
    import torch

    ours, theirs = reference.state_dict(), loaded.state_dict()
    for name, (gguf_name, type_name) in written.tensors.items():
        if name not in theirs:
            raise VerifyError(f"{gguf_name} ({name}) is not in the model read back")
        if not torch.equal(ours[name], theirs[name]):
            diff = (ours[name] - theirs[name]).abs().max().item()
            raise VerifyError(
                f"{gguf_name} ({type_name}) reads back off by up to {diff:.3g} from the source's {name}"
            )


def check_stops(path: Path, source: src.Source, loaded_tokenizer: Any) -> list[str]:
    metadata = read_metadata(path)
    ids = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    carried = set(metadata.get("chatft.stop_token_ids") or []) | {i for i in ids if i is not None}
    if carried != set(source.stop_ids):
        raise VerifyError(
            f"the file's stop tokens are {sorted(carried)}, the source's {sorted(source.stop_ids)}"
        )
    for kind in ("eos_token", "bos_token", "pad_token"):
        a, b = getattr(source.tokenizer, kind), getattr(loaded_tokenizer, kind)
        if a != b and not (kind == "pad_token" and a == source.tokenizer.eos_token and b is None):
            raise VerifyError(f"the tokenizer read back has {kind} {b!r}, the source {a!r}")
    return loaded_tokenizer.convert_ids_to_tokens(source.stop_ids)


def check_tokenizer(source: src.Source, tokenizer: Any, conversations: list[Conversation]) -> tuple[int, int]:
    """Every conversation rendered (whole, as training renders it, and up to the answer, as inference does) by
    each side's own chat template and tokenizer must give the same text and ids; so must the plain texts.
    Returns (texts compared, tokens compared)."""
    from chatft.data.templates import render_with_spans

    theirs_template = file_template(tokenizer)
    texts = tokens = 0
    for text in PLAIN_TEXTS:
        a, b = source.tokenizer(text)["input_ids"], tokenizer(text)["input_ids"]
        if a != b:
            raise VerifyError(
                f"the tokenizer read back encodes {text[:30]!r} as {b[:12]}..., the source as {a[:12]}..."
            )
        texts, tokens = texts + 1, tokens + len(a)
    if source.raw or source.template is None:
        return texts, tokens
    if theirs_template is None:
        raise VerifyError("the file carries no chat template")
    for conv in conversations:
        for side in ("whole", "prompt"):
            if side == "whole":
                a = render_with_spans(conv, source.tokenizer, source.template)[0]
                b = render_with_spans(conv, tokenizer, theirs_template)[0]
            else:
                last = max(i for i, m in enumerate(conv.messages) if m.role == "user")
                ask = Conversation(conv.messages[: last + 1], tools=conv.tools)
                a = src.prompt(_session(source.model, source.tokenizer, source), ask)[0]
                b = src.prompt(_session(None, tokenizer, source, theirs_template), ask)[0]
            if a != b:
                raise VerifyError(f"the chat template read back renders {b[:60]!r}, the source's {a[:60]!r}")
            ids_a = source.tokenizer(a, add_special_tokens=False)["input_ids"]
            ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
            if ids_a != ids_b:
                at = first_difference(ids_a, ids_b)
                raise VerifyError(
                    f"the tokenizer read back gives other ids for a rendered conversation from token {at} on "
                    f"({ids_b[at : at + 6]} vs the source's {ids_a[at : at + 6]})"
                )
            texts, tokens = texts + 1, tokens + len(ids_a)
    return texts, tokens


def file_template(tokenizer: Any) -> Any:
    """The template that renders with the chat template a tokenizer read back from the file carries."""
    from chatft.data.templates import get_template

    return get_template(None, tokenizer) if getattr(tokenizer, "chat_template", None) else None


def _session(model: Any, tokenizer: Any, source: src.Source, template: Any = "source") -> Any:
    template = source.template if template == "source" else template
    return src.session_for(model, tokenizer, template, source.raw, source.stop_ids)


def prompts(conversations: list[Conversation], raw: bool, count: int) -> list[Conversation]:
    firsts = [
        Conversation([m for m in c.messages[:2] if m.role in ("system", "user")]) for c in conversations
    ]
    firsts = [c for c in firsts if c.messages and c.messages[-1].role == "user"]
    if raw:
        return [Conversation([Message("user", c.messages[-1].content)], raw=True) for c in firsts[:count]]
    return firsts[:count]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(answers identical, share of answer tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = sum(first_difference(x, y) for x, y in zip(a, b, strict=True))
    total = sum(max(len(x), len(y)) for x, y in zip(a, b, strict=True))
    return same, prefix / total if total else 1.0


def verify(
    path: Path,
    source: src.Source,
    written: Written,
    file_type: str,
    conversations: list[Conversation],
    n_prompts: int = 4,
    max_new_tokens: int = 32,
) -> Verification:
    report = Verification()
    model, tokenizer = load_back(path)
    report.loaded = (model, tokenizer)
    check_config(source.model, model)
    reference, n_rounded = reference_model(source.model, written)
    check_weights(reference, model, written)
    precision = "exactly" if not n_rounded else f"exactly at {file_type} precision ({n_rounded} rounded)"
    report.lines.append(
        f"loads back with transformers as {type(model).__name__}; {len(written.tensors)} weights equal the source's {precision}"
    )
    stops = check_stops(path, source, tokenizer)
    texts, tokens = check_tokenizer(source, tokenizer, conversations)
    report.lines.append(
        f"tokenizer: {texts} texts ({len(conversations)} conversations rendered whole and up to the answer, "
        f"{len(PLAIN_TEXTS)} plain) give the source's ids, {tokens} tokens; stops at {', '.join(stops)}"
    )
    asks = prompts(conversations, source.raw, n_prompts)
    theirs_template = None if source.raw or source.template is None else file_template(tokenizer)
    ours_session = _session(reference, source.tokenizer, source)
    theirs_session = _session(model, tokenizer, source, theirs_template)
    ours_ids = [src.prompt(ours_session, c)[1] for c in asks]
    theirs_ids = [src.prompt(theirs_session, c)[1] for c in asks]
    if ours_ids != theirs_ids:
        raise VerifyError("the file's tokenizer and chat template encode the greedy prompts differently")
    expected = src.greedy(ours_session, ours_ids, max_new_tokens)
    got = src.greedy(theirs_session, theirs_ids, max_new_tokens)
    if got != expected:
        same, share = agreement(expected, got)
        raise VerifyError(
            f"greedy answers differ from the source's{'' if not n_rounded else f' at {file_type} precision'}: "
            f"{same}/{len(asks)} identical ({share:.0%} of tokens before the first difference)"
        )
    n_tokens = sum(len(x) for x in got)
    line = f"greedy: {len(asks)} prompts, {n_tokens} answer tokens, identical to the source's"
    if n_rounded:
        full = src.greedy(_session(source.model, source.tokenizer, source), ours_ids, max_new_tokens)
        same, share = agreement(full, got)
        line += (
            f" at {file_type} precision; against the float32 source: {same}/{len(asks)} answers identical, "
            f"{share:.0%} of answer tokens before the first difference"
        )
    report.lines.append(line)
    report.prompts, report.answers = theirs_ids, got
    return report
