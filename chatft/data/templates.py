"""Conversation -> (input_ids, labels), rendered by the model's own chat template or a native one.

How labels are found, for every template alike:
- The whole conversation is rendered once and tokenized once; characters are mapped to tokens with the
  offsets (tokenizing pieces separately changes tokens at the seams).
- A trained assistant turn i covers the characters its own rendering adds after render(messages[:i],
  add_generation_prompt=True): what the model must generate, never the header the generation prompt holds.
  A template that renders earlier turns differently once later ones exist cannot be trained exactly and is
  refused (render_with_spans).
- A token holding any trained character is trained.
- The end-of-turn rule (encode_chat): every trained turn trains exactly one closing token, its own (<|im_end|>),
  the next role's token (ChatGLM3, GLM-4), or an appended EOS at the end; a turn with none is refused.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from chatft.data.schema import Conversation, Message, ToolCall

IGNORE_INDEX = -100

TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"


class TemplateError(ValueError):
    """The conversation cannot be rendered exactly with this template."""


# --- renderings of tools for templates that have no notion of them (Qwen2.5/Hermes style, documented) ---


def tools_system_text(tools: Any) -> str:
    """Tool definitions as system text: ChatGLM3's fixed preamble, then the definitions as indented JSON."""
    return TOOLS_PREAMBLE + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def tool_call_text(calls: list[ToolCall]) -> str:
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )


def tool_response_text(content: str) -> str:
    return "<tool_response>\n" + content + "\n</tool_response>"


def chatglm3_tool_call(call: ToolCall) -> str:
    """ChatGLM3's tool call: a python code block `tool_call(key=value, ...)`, as its fine-tuning demo wrote it."""
    keywords = [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in call.arguments.items()]
    code = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords))
    return "```python\n" + code + "\n```"


# --- templates: a Jinja chat template plus the conversion of canonical messages to its message dicts ---


@dataclass
class Rendered:
    """Message dicts for a Jinja template, whether each is a trained turn, and the tools to pass it."""

    messages: list[dict]
    trained: list[bool]
    tools: Any = None

    def add(self, message: dict, trained: bool = False) -> None:
        self.messages.append(message)
        self.trained.append(trained)


@dataclass(frozen=True)
class Template:
    name: str
    chat_template: str | None  # None: the tokenizer's own
    to_dicts: Callable[[Conversation, bool], Rendered]  # (conversation, template has native tools) -> dicts


def _generic_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    """OpenAI-style message dicts. Without native tool support, tools and tool turns become documented text."""
    native = tools_native and _is_tool_schema_list(conv.tools)
    out = Rendered([], [], conv.tools if native else None)
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            if native:
                calls = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
                out.add({"role": "assistant", "content": m.content, "tool_calls": calls}, m.trained)
            else:
                text = (m.content + "\n" if m.content else "") + tool_call_text(m.tool_calls)
                out.add({"role": "assistant", "content": text}, m.trained)
        elif m.role == "tool":
            if native:
                out.add({"role": "tool", "content": m.content, "name": m.name})
            else:
                out.add({"role": "user", "content": tool_response_text(m.content)})
        else:
            out.add({"role": m.role, "content": m.content}, m.trained)
    if conv.tools is not None and not native:
        text = tools_system_text(conv.tools)
        if out.messages and out.messages[0]["role"] == "system":
            out.messages[0] = {"role": "system", "content": out.messages[0]["content"] + "\n\n" + text}
        else:
            out.messages.insert(0, {"role": "system", "content": text})
            out.trained.insert(0, False)
    return out


def _chatglm3_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    out = Rendered([], [])
    if conv.tools is not None:
        out.add({"role": "system", "content": tools_system_text(conv.tools)})
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            for c in m.tool_calls:
                out.add(
                    {"role": "assistant", "metadata": c.name, "content": chatglm3_tool_call(c)}, m.trained
                )
        elif m.role == "tool":
            out.add({"role": "observation", "content": m.content})
        else:
            out.add({"role": m.role, "content": m.content}, m.trained)
    return out


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatGLM3: [gMASK]sop, then <|role|>{metadata}\n{content} per message; the turn ends at the next role token or
# EOS. The generation prompt is only <|assistant|>: the metadata line (a tool's name) is the model's to write.
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>{{ message.get('metadata', '') }}\n"
    "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

NATIVE_TEMPLATES = {
    "chatml": Template("chatml", CHATML_TEMPLATE, _generic_dicts),
    "chatglm3": Template("chatglm3", CHATGLM3_TEMPLATE, _chatglm3_dicts),
}


def get_template(name: str | None, tokenizer: PreTrainedTokenizerBase) -> Template:
    if name:
        if name not in NATIVE_TEMPLATES:
            raise TemplateError(
                f"unknown --template {name!r}; native templates: {', '.join(NATIVE_TEMPLATES)}"
            )
        return NATIVE_TEMPLATES[name]
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer has no chat template; choose a native one with --template ({', '.join(NATIVE_TEMPLATES)})"
        )
    return Template("tokenizer", None, _generic_dicts)


def template_supports_tools(template: Template, tokenizer: PreTrainedTokenizerBase) -> bool:
    source = template.chat_template or tokenizer.chat_template
    if isinstance(source, dict):  # several named templates: the default one is used
        source = source.get("default", "")
    return "tool_calls" in source and "tools" in source


def _is_tool_schema_list(tools: Any) -> bool:
    return isinstance(tools, list) and all(isinstance(t, dict) for t in tools)


# --- encoding ---


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]  # token index just past each trained assistant turn (where a truncation may cut)
    cut: bool = False  # input-output: the prompt or response was cut to max_source/target_length
    closers: list[int] = field(default_factory=list)  # the closing token trained at the end of each turn


def _render(tokenizer, template: Template, msgs: list[dict], tools: Any, generation_prompt: bool) -> str:
    if not msgs:
        return ""
    try:
        return tokenizer.apply_chat_template(
            msgs,
            tools=tools,
            chat_template=template.chat_template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
    except (
        Exception
    ) as e:  # jinja raises whatever the template's author chose (raise_exception, TypeError, ...)
        raise TemplateError(f"the chat template failed to render: {e}") from e


def render_generation_prompt(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    """What inference encodes: the conversation so far and the header of the assistant turn to generate, rendered
    exactly as training rendered it (same message dicts, same template)."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    return _render(tokenizer, template, r.messages, r.tools, True)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    ids.discard(tokenizer.unk_token_id)  # an unknown character is text, not the end of a turn
    return ids


def render_with_spans(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and, per trained assistant turn, the characters that turn adds after its generation
    prompt: [len(render(turns before it, generation prompt)), end of its own text).

    A turn's own text ends where the conversation would go on: render(turns through it) minus a trailer, text a
    template writes only at the very end of a conversation (Phi-3 appends its EOS there), found by continuing the
    conversation with one more user turn. A trailer may hold only special tokens and white space, and the turn's
    own text must stand unchanged in the whole rendering; otherwise the template renders the turn differently once
    later turns follow, and it cannot be labelled exactly.
    """
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    full = _render(tokenizer, template, r.messages, r.tools, False)
    trained = [i for i, t in enumerate(r.trained) if t]
    if not trained:
        return full, []
    if trained[0] == 0:
        raise TemplateError("an assistant turn cannot be the first message")
    continued = full
    if r.messages[-1].get("role") == "assistant":
        # a template that cannot go on after the last turn: no trailer is looked for
        with contextlib.suppress(TemplateError):
            more = [*r.messages, {"role": "user", "content": "?"}]
            continued = _render(tokenizer, template, more, r.tools, False)
    boundaries = _token_ends(tokenizer, continued)
    specials = _special_ids(tokenizer)
    spans = []
    for i in trained:
        head = _render(tokenizer, template, r.messages[:i], r.tools, True)
        upto = _render(tokenizer, template, r.messages[: i + 1], r.tools, False)
        end = _own_end(upto, continued, boundaries)
        fits = (
            end >= len(head) and full.startswith(upto[:end]) and _is_trailer(tokenizer, upto[end:], specials)
        )
        if not fits and upto == full:
            # the last message, which the template renders differently once a turn follows (Qwen3 gives the
            # final answer an empty think block): nothing follows it here, so all of its rendering is its own
            end, fits = len(full), True
        if not (upto.startswith(head) and fits):
            raise TemplateError(
                f"the chat template renders turn {i + 1} differently once later turns follow (reasoning templates "
                "drop earlier thoughts; some move the system text to the last user turn), or its generation prompt "
                "is not how that turn starts, so it cannot be trained exactly in this conversation; train only the "
                'last answer (set "loss": false on the earlier assistant turns), split the conversation into one '
                "record per answer, or use a template that renders each turn the same wherever it stands (--template "
                f"{', '.join(NATIVE_TEMPLATES)}, or your own chat_template)"
            )
        spans.append((len(head), end))
    return full, spans


def _token_ends(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sorted({e for _, e in offsets})


def _own_end(upto: str, continued: str, boundaries: list[int]) -> int:
    """Where upto stops agreeing with the continued conversation, moved back to the end of a token there (so
    that a trailer and the next turn's header starting with the same characters are told apart)."""
    common = 0
    for a, b in zip(upto, continued, strict=False):
        if a != b:
            break
        common += 1
    if common == len(upto) and common == len(continued):
        return common
    at = bisect.bisect_right(boundaries, common) - 1
    return boundaries[at] if at >= 0 else 0


def _is_trailer(tokenizer: PreTrainedTokenizerBase, text: str, specials: set[int]) -> bool:
    if not text.strip():
        return True
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return all(
        t in specials or not text[s:e].strip()
        for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    )


def _token_range(starts: list[int], ends: list[int], span: tuple[int, int]) -> tuple[int, int]:
    """[first, stop) of the tokens holding any character of span (offsets are sorted, as tokens are in order)."""
    first = bisect.bisect_right(ends, span[0])
    stop = bisect.bisect_left(starts, span[1])
    return first, max(first, stop)


def encode_chat(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template) -> Encoded:
    """Labels by the end-of-turn rule: every trained assistant turn trains its text after the generation prompt
    and exactly one closing token, which is
    - the last special token of the turn's own text (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
      <end_of_turn>, Mistral's </s>, Phi-3's <|end|>); what follows it (a newline) is not trained;
    - else the special token that follows the turn, after white space only (GLM and ChatGLM3: the next role's
      token, <|user|> or <|observation|>), the white space trained with it;
    - else, at the very end of the conversation, an appended EOS.
    Anything else (the turn's text followed by ordinary text, or holding the closer before its end) is refused
    with the reason: the model would not learn where its turn ends."""
    text, spans = render_with_spans(conv, tokenizer, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    starts = [s for s, _ in enc["offset_mapping"]]
    # a zero-width token counts for the character at s
    ends = [max(e, s + 1) for s, e in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    specials = _special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    turn_ends, closers = [], []
    for n, span in enumerate(spans, start=1):
        first, stop = _token_range(starts, ends, span)
        while first < stop and ids[first] in specials and starts[first] < span[0]:
            first += 1  # a header token that swallows the white space after it (rstrip, as Phi-3's) stays untrained
        own = [k for k in range(first, stop) if ids[k] in specials]
        if own:
            stop = own[-1] + 1
        else:
            while (
                stop < len(ids) and ids[stop] not in specials and not text[starts[stop] : ends[stop]].strip()
            ):
                stop += 1  # white space between the turn and what closes it
            if stop < len(ids) and ids[stop] in specials:
                stop += 1
            elif stop == len(ids):
                ids.append(_eos_id(tokenizer))
                labels.append(IGNORE_INDEX)
                stop += 1
            else:
                raise TemplateError(
                    f"assistant turn {n} has no closing token: the template ends it with neither a special token "
                    f"of its own nor a special token after it (it is followed by {text[starts[stop] : ends[stop]]!r}), "
                    "so the model could not learn where its turn ends; use a template that closes turns with a "
                    "special token"
                )
        closer = ids[stop - 1]
        early = [k for k in range(first, stop - 1) if ids[k] in (closer, eos)]
        if early:
            raise TemplateError(
                f"assistant turn {n} holds its end-of-turn token {tokenizer.convert_ids_to_tokens(ids[early[0]])!r} "
                "inside its text: the model would learn to end the turn there; remove it from the data"
            )
        labels[first:stop] = ids[first:stop]
        turn_ends.append(stop)
        closers.append(closer)
    return Encoded(ids, labels, turn_ends, closers=closers)


def encode_raw(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> Encoded:
    """input-output data: the prompt (with the tokenizer's own prefix tokens, e.g. BOS) untrained, then the
    response and EOS trained. Prompt and response are tokenized apart, as at inference the prompt is encoded
    alone and the model continues it. A response cut by max_target_length gets no EOS: it did not end there, and
    an EOS would teach the model to stop mid-answer."""
    prompt, response = conv.messages[0].content, conv.messages[1].content
    a = with_prefix_tokens(tokenizer, prompt)
    b = tokenizer(response, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    n_a, n_b = len(a), len(b)
    if max_source_length is not None:
        a = a[:max_source_length]
    if max_target_length is not None:
        b = b[:max_target_length]
    cut = len(a) < n_a or len(b) < n_b
    closers = [] if len(b) < n_b else [b[-1]]
    return Encoded(a + b, [IGNORE_INDEX] * len(a) + b, [len(a) + len(b)], cut, closers)


def with_prefix_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """text's ids with the special tokens the tokenizer puts before it, and none it would put after (an EOS
    after the prompt would tell the model the conversation is over)."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[: i + len(plain)]
    return plain


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token to end a trained turn with")
    return tokenizer.eos_token_id


def encode(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | None,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> Encoded:
    """template None: only input-output (raw) data can be encoded (a tokenizer with no chat template)."""
    if conv.raw:
        return encode_raw(conv, tokenizer, max_source_length, max_target_length)
    if template is None:
        raise TemplateError(
            f"the tokenizer has no chat template; choose a native one with --template ({', '.join(NATIVE_TEMPLATES)})"
        )
    return encode_chat(conv, tokenizer, template)


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
            found += encode_chat(conv, tokenizer, template).closers
        except TemplateError:  # e.g. a template that refuses tool turns: the other probes still tell
            continue
    return list(dict.fromkeys(found))


def truncate(enc: Encoded, max_length: int) -> tuple[Encoded, bool]:
    """Cut to max_length tokens: drop whole later turns first (cut just after the last trained turn that fits);
    cut inside a turn only when not even the first one fits. Returns (example, whether anything was cut, here or
    by max_source/target_length)."""
    if len(enc.input_ids) <= max_length:
        return enc, enc.cut
    kept = [k for k, e in enumerate(enc.turn_ends) if e <= max_length]
    cut = enc.turn_ends[kept[-1]] if kept else max_length
    turn_ends = [enc.turn_ends[k] for k in kept]
    closers = [enc.closers[k] for k in kept]
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], turn_ends, True, closers), True
