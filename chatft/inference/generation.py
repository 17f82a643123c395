"""Render a prompt exactly as training rendered it, and generate an answer to it.

Every prompt is rendered as in training: the template's message dicts through apply_chat_template with
add_generation_prompt=True, tokenized with no added special tokens; input-output records as raw text with the
tokenizer's own prefix tokens (BOS) and no markup. Generation stops at every end of turn (Session.stop_ids).
Greedy unless do_sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatft.data.schema import Conversation, Message
from chatft.data.templates import (
    NATIVE_TEMPLATES,
    TemplateError,
    render_generation_prompt,
    with_prefix_tokens,
)
from chatft.inference.common import to_stderr
from chatft.inference.loading import Session


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None


def render_prompt(session: Session, conv: Conversation) -> tuple[str, list[int]]:
    """(the text the tokenizer encodes, the ids) of a conversation that ends where the model answers."""
    tokenizer = session.tokenizer
    if conv.raw:
        text = conv.messages[-1].content
        return text, with_prefix_tokens(tokenizer, text)
    template = session.template
    if template is None:
        raise TemplateError(
            "the tokenizer has no chat template and this record is a chat: choose one with --template "
            f"({', '.join(NATIVE_TEMPLATES)})"
        )
    text = render_generation_prompt(conv, tokenizer, template)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_for(
    session: Session, history: list[Message], system: str | None, tools: list | None = None
) -> Conversation:
    if session.raw:
        return Conversation([history[-1]], raw=True)
    head = [Message("system", system)] if system else []
    return Conversation(head + history, tools=tools)


def generation_config(session: Session, options: GenerationOptions) -> Any:
    from transformers import GenerationConfig

    own = session.model.generation_config
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        eos_token_id=session.stop_ids,
        pad_token_id=session.tokenizer.pad_token_id,
        bos_token_id=own.bos_token_id,
        use_cache=True,  # a checkpoint saved mid-training has use_cache False in its config
    )
    if options.do_sample:
        config.temperature = options.temperature if options.temperature is not None else own.temperature
        config.top_p = options.top_p if options.top_p is not None else own.top_p
        config.top_k = own.top_k
    return config


def generate(
    session: Session, prompts: list[list[int]], options: GenerationOptions, streamer: Any = None
) -> list[list[int]]:
    """The new ids of each prompt (left-padded into one batch), cut before the first stop token."""
    import torch

    pad = session.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=session.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=session.device)
    with torch.inference_mode():
        out = session.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=generation_config(session, options),
            streamer=streamer,
        )
    stops = set(session.stop_ids)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:end])
    return results


def decode(session: Session, ids: list[int]) -> str:
    """The answer's text; a trailing U+FFFD (a multi-byte character cut by max_new_tokens) is dropped."""
    return session.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


def answer(
    session: Session,
    options: GenerationOptions,
    prompt: str,
    system: str | None = None,
    tools: list | None = None,
) -> str:
    conv = conversation_for(session, [Message("user", prompt)], system, tools)
    text, ids = render_prompt(session, conv)
    print_prompt(session, text)
    return decode(session, generate(session, [ids], options)[0])


def print_prompt(session: Session, text: str) -> None:
    if session.show_prompt:
        to_stderr(f"--- prompt ---\n{text}\n--- end of prompt ---")
