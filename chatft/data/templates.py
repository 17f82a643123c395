"""Conversation -> (input_ids, labels), rendered by the model's own chat template or a native one.

How labels are found, for every template alike:
- One rule for every trained assistant turn i: it is trained in exactly the context the template gives it when
  the model generates it. Its own example is render(messages[:i+1]), the turn trained from the end of
  render(messages[:i], add_generation_prompt=True) through its closing token (its reasoning included), nothing
  else trained (plan_examples). Most templates render a turn the same once later turns follow: those turns share
  one example, the whole conversation (as a stable template always did). Templates that rewrite the history
  (Qwen3 drops the reasoning of earlier answers and gives only the final answer its think block; Mistral moves
  the system text to the last user turn) give such turns an example of their own: a conversation can become
  several examples, no turn trained twice, none dropped.
- Each example is rendered once and tokenized once; characters are mapped to tokens with the offsets
  (tokenizing pieces separately changes tokens at the seams). A token holding any trained character is trained.
- The end-of-turn rule (encode_examples): every trained turn trains exactly one closing token, its own
  (<|im_end|>), the next role's token (ChatGLM3, GLM-4), or an appended EOS at the end; a turn with none is
  refused.
- Reasoning (Message.reasoning) reaches the template as the message's `reasoning_content`. A template with no
  place for it (it renders the turn the same with and without it) is refused for that record, with the reason:
  training would silently drop the reasoning.
- chat_template_kwargs (Template.kwargs, e.g. {"enable_thinking": false}) go to every rendering.

The stages, a module each: rendering.py (templates, rendering, chat_template_kwargs), history.py (plan_examples:
the examples a conversation trains as), labels.py (labels by character offsets, the end-of-turn rule, encode_raw,
truncate); this module encodes a conversation into its examples with them and re-exports the names other modules
take from here (__all__).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from chatft.data.history import plan_examples, render_with_spans
from chatft.data.labels import (
    IGNORE_INDEX,
    Encoded,
    _eos_id,
    encode_piece,
    encode_raw,
    truncate,
    with_prefix_tokens,
)
from chatft.data.rendering import (
    NATIVE_TEMPLATES,
    Template,
    TemplateError,
    get_template,
    parse_chat_template_kwargs,
    render_conversation,
    render_generation_prompt,
    template_supports_tools,
    tool_call_text,
)
from chatft.data.schema import Conversation, Message, ToolCall

__all__ = [
    "IGNORE_INDEX",
    "NATIVE_TEMPLATES",
    "Encoded",
    "Template",
    "TemplateError",
    "closing_token_ids",
    "encode",
    "encode_chat",
    "encode_examples",
    "encode_raw",
    "get_template",
    "parse_chat_template_kwargs",
    "plan_examples",
    "render_conversation",
    "render_generation_prompt",
    "render_with_spans",
    "template_supports_tools",
    "tool_call_text",
    "truncate",
    "with_prefix_tokens",
]


def encode_examples(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | None,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> list[Encoded]:
    """Every training example of a conversation: one for input-output (raw) data; for chat data one per
    plan_examples text (one for a template that renders each turn the same wherever it stands). template None:
    only raw data can be encoded (a tokenizer with no chat template)."""
    if conv.raw:
        return [encode_raw(conv, tokenizer, max_source_length, max_target_length)]
    if template is None:
        raise TemplateError(
            f"the tokenizer has no chat template; choose a native one with --template ({', '.join(NATIVE_TEMPLATES)})"
        )
    return [encode_piece(p, tokenizer) for p in plan_examples(conv, tokenizer, template)]


def encode_chat(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template) -> Encoded:
    """The one example of a conversation that trains as one (every conversation whose trained turns the
    template renders the same wherever they stand; any with a single trained turn); TemplateError for one that
    needs several (encode_examples)."""
    return _the_one(encode_examples(conv, tokenizer, template))


def _the_one(examples: list[Encoded]) -> Encoded:
    if len(examples) > 1:
        raise TemplateError(
            f"the chat template renders earlier turns differently once later turns follow: this conversation "
            f"trains as {len(examples)} examples (encode_examples), not one"
        )
    return examples[0]


def encode(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | None,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> Encoded:
    """The one example of a conversation that trains as one (encode_chat, encode_raw)."""
    return _the_one(encode_examples(conv, tokenizer, template, max_source_length, max_target_length))


_PROBES = (
    Conversation([Message("user", "hi"), Message("assistant", "hello")]),
    Conversation(
        [
            Message("user", "hi"),
            Message("assistant", "hello"),
            Message("user", "bye"),
            Message("assistant", "ok"),
        ]
    ),
    Conversation(
        [
            Message("user", "hi"),
            Message("assistant", "", tool_calls=[ToolCall("f", {"x": 1})]),
            Message("tool", "1", name="f"),
            Message("assistant", "ok"),
        ],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    ),
)


def closing_token_ids(tokenizer: PreTrainedTokenizerBase, template: Template | None) -> list[int]:
    """The closing tokens training trains for this template (found by encoding a few probe conversations: plain,
    multi-turn, with a tool call), EOS for raw prompts (template None). Generation must stop at each."""
    if template is None:
        return [_eos_id(tokenizer)]
    found: list[int] = []
    for conv in _PROBES:
        try:
            found += [c for e in encode_examples(conv, tokenizer, template) for c in e.closers]
        except TemplateError:  # e.g. a template that refuses tool turns: the other probes still tell
            continue
    return list(dict.fromkeys(found))
