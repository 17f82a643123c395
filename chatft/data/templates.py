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
"""

from __future__ import annotations

import ast
import bisect
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    # chat_template_kwargs: extra variables for every rendering (training, check_data, inference alike)
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


def _with_reasoning(message: dict, m: Message) -> dict:
    """The dict with the message's reasoning as `reasoning_content` (what Qwen3- and DeepSeek-style templates
    read), when it has one."""
    return message if m.reasoning is None else {**message, "reasoning_content": m.reasoning}


def _generic_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    """OpenAI-style message dicts. Without native tool support, tools and tool turns become documented text. An
    assistant turn with both text and tool calls keeps both."""
    native = tools_native and _is_tool_schema_list(conv.tools)
    out = Rendered([], [], conv.tools if native else None)
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            if native:
                calls = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
                message = {"role": "assistant", "content": m.content, "tool_calls": calls}
            else:
                text = (m.content + "\n" if m.content else "") + tool_call_text(m.tool_calls)
                message = {"role": "assistant", "content": text}
            out.add(_with_reasoning(message, m), m.trained)
        elif m.role == "tool":
            if native:
                out.add({"role": "tool", "content": m.content, "name": m.name})
            else:
                out.add({"role": "user", "content": tool_response_text(m.content)})
        else:
            out.add(_with_reasoning({"role": m.role, "content": m.content}, m), m.trained)
    if conv.tools is not None and not native:
        text = tools_system_text(conv.tools)
        if out.messages and out.messages[0]["role"] == "system":
            out.messages[0] = {"role": "system", "content": out.messages[0]["content"] + "\n\n" + text}
        else:
            out.messages.insert(0, {"role": "system", "content": text})
            out.trained.insert(0, False)
    return out


def _chatglm3_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    """ChatGLM3's messages: a tool call is an assistant message of its own (metadata: the tool's name); text
    written beside tool calls comes first, as an assistant message of its own (ChatGLM3 has no other place for
    it). ChatGLM3 has no place for reasoning: a record with some is refused (plan_examples)."""
    out = Rendered([], [])
    if conv.tools is not None:
        out.add({"role": "system", "content": tools_system_text(conv.tools)})
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            if m.content:
                out.add({"role": "assistant", "content": m.content}, m.trained)
            for c in m.tool_calls:
                out.add(
                    {"role": "assistant", "metadata": c.name, "content": chatglm3_tool_call(c)}, m.trained
                )
        elif m.role == "tool":
            out.add({"role": "observation", "content": m.content})
        else:
            out.add(_with_reasoning({"role": m.role, "content": m.content}, m), m.trained)
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


def get_template(
    name: str | None, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: str | dict | None = None
) -> Template:
    """The native template `name`, or the tokenizer's own (name None), rendering with chat_template_kwargs (a
    dict, or its JSON text as --chat_template_kwargs takes it; parse_chat_template_kwargs says what is allowed).
    Inference and serving get the template training used by calling this with the run's saved arguments."""
    kwargs = parse_chat_template_kwargs(chat_template_kwargs)
    if name:
        if name not in NATIVE_TEMPLATES:
            raise TemplateError(
                f"unknown --template {name!r}; native templates: {', '.join(NATIVE_TEMPLATES)}"
            )
        return replace(NATIVE_TEMPLATES[name], kwargs=kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer has no chat template; choose a native one with --template ({', '.join(NATIVE_TEMPLATES)})"
        )
    return Template("tokenizer", None, _generic_dicts, kwargs)


# apply_chat_template's own parameters: a template variable of the same name would be taken as one of them
_RESERVED_KWARGS = frozenset(
    name
    for name in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    if name not in ("self", "kwargs")
) | {"messages"}


def parse_chat_template_kwargs(value: str | dict | None) -> dict[str, Any]:
    """--chat_template_kwargs as a dict: a JSON object (text) or a dict; None or "" is {}. ValueError, saying why,
    for anything else or for a name apply_chat_template keeps for itself (add_generation_prompt, tools, ...)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(
                f'--chat_template_kwargs must be a JSON object like {{"enable_thinking": false}}: {e}'
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"--chat_template_kwargs must be a JSON object, got {type(value).__name__}")
    reserved = sorted(k for k in value if k in _RESERVED_KWARGS)
    if reserved:
        raise ValueError(
            f"--chat_template_kwargs cannot set {', '.join(reserved)}: chatft sets it for each rendering"
        )
    return dict(value)


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
    turns: list[int] = field(default_factory=list)  # which trained turns of the conversation (1 = its first)


@dataclass
class Piece:
    """One training example's text: spans[k] = [start, end) characters of trained turn turns[k] (1-based among
    the conversation's trained turns), from the end of its generation prompt to the end of its own text."""

    text: str
    spans: list[tuple[int, int]]
    turns: list[int]


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
            **template.kwargs,
        )
    except (
        Exception
    ) as e:  # jinja raises whatever the template's author chose (raise_exception, TypeError, ...)
        raise TemplateError(f"the chat template failed to render: {e}") from e


def render_generation_prompt(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    """What inference encodes: the conversation so far and the header of the assistant turn to generate, rendered
    exactly as training rendered it (same message dicts, same template, same chat_template_kwargs)."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    return _render(tokenizer, template, r.messages, r.tools, True)


def render_conversation(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template) -> str:
    """The whole conversation as the template renders it (no generation prompt)."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    return _render(tokenizer, template, r.messages, r.tools, False)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    ids.discard(tokenizer.unk_token_id)  # an unknown character is text, not the end of a turn
    return ids


@dataclass
class _Own:
    """A trained turn's own example: text = its generation prompt (head, len(head) = start) + what it generates;
    end: where its own text ends (before a trailer)."""

    text: str
    start: int
    end: int


def plan_examples(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template) -> list[Piece]:
    """The texts a conversation is trained as, and the characters each trains (see the module docstring).

    Every trained turn i has its own example: render(messages[:i+1]), trained from len(head) where head =
    render(messages[:i], generation prompt) (Mistral v0.3, which writes the system text only into a user turn that
    ends the conversation, renders no conversation holding both: there the example is head + the text the turn
    adds, _completion_start). Its own text ends before a trailer, text a template writes only at the very end of
    a conversation that asks for no answer (Phi-3 appends its EOS there, _trailer). Then the turns are grouped:
    the whole conversation's rendering trains every turn whose own example, through its own text, it starts
    with (the turn and all it follows rendered the same); each turn left gets an example from the latest one
    left, shared likewise. Examples come in the order of their first turn."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    msgs, tools = r.messages, r.tools
    full = _render(tokenizer, template, msgs, tools, False)
    trained = [i for i, t in enumerate(r.trained) if t]
    if trained and trained[0] == 0:
        raise TemplateError("an assistant turn cannot be the first message")
    uptos = {i: _render(tokenizer, template, msgs[: i + 1], tools, False) for i in trained}
    _check_reasoning_has_a_place(tokenizer, template, msgs, tools, uptos)
    if not trained:
        return [Piece(full, [], [])]
    own: dict[int, _Own] = {}
    trailer: str | None = None
    for i in trained:
        head = _render(tokenizer, template, msgs[:i], tools, True)
        upto = uptos[i]
        if trailer is None:
            trailer = _trailer(tokenizer, template, msgs[:i], tools, head)
        if upto.startswith(head):
            text = upto
        else:
            prompt = _render(tokenizer, template, msgs[:i], tools, False)
            text = head + upto[_completion_start(head, upto, prompt, msgs[i - 1], msgs[i], i, template) :]
        end = len(text) - len(trailer) if trailer and text.endswith(trailer) else len(text)
        if end <= len(head):
            raise TemplateError(
                f"the chat template renders nothing for turn {i + 1} after its generation prompt"
            )
        own[i] = _Own(text, len(head), end)
    left = list(trained)
    pieces = []
    for text in [full, *(own[j].text for j in reversed(trained))]:
        members = [i for i in left if text.startswith(own[i].text[: own[i].end])]
        if members:
            spans = [(own[i].start, own[i].end) for i in members]
            pieces.append(Piece(text, spans, [trained.index(i) + 1 for i in members]))
            left = [i for i in left if i not in members]
        if not left:
            break
    return sorted(pieces, key=lambda p: p.turns[0])


def _check_reasoning_has_a_place(
    tokenizer, template: Template, msgs: list[dict], tools: Any, uptos: dict[int, str]
) -> None:
    """Refuse reasoning the template does not render: a turn with reasoning that renders the same without it, as
    the last message (where every reasoning template shows it), would train without its reasoning."""
    for k, m in enumerate(msgs):
        reasoning = m.get("reasoning_content")
        if not (isinstance(reasoning, str) and reasoning.strip()):
            continue
        upto = uptos.get(k)
        if upto is None:
            upto = _render(tokenizer, template, msgs[: k + 1], tools, False)
        bare = {key: value for key, value in m.items() if key != "reasoning_content"}
        if _render(tokenizer, template, [*msgs[:k], bare], tools, False) == upto:
            which = (
                "the tokenizer's chat template"
                if template.chat_template is None
                else f"--template {template.name}"
            )
            raise TemplateError(
                f"turn {k + 1} has reasoning, but {which} has no place for it (it renders the turn the same with "
                "and without its reasoning_content), so training would drop it; use a model whose chat template "
                "renders reasoning_content (a reasoning model's: Qwen3, DeepSeek-R1 style), or leave the "
                "reasoning out of the data"
            )


def _trailer(tokenizer, template: Template, prompt: list[dict], tools: Any, head: str) -> str:
    """Text the template writes only at the end of a conversation that asks for no answer (Phi-3's EOS): what
    render(prompt) has where render(prompt, generation prompt) parts from it, from the end of a token there (a
    trailer and a generation prompt starting with the same characters are told apart). Special tokens and white
    space only; else ""."""
    try:
        plain = _render(tokenizer, template, prompt, tools, False)
    except TemplateError:  # a template that insists on a generation prompt after a user turn
        return ""
    common = _common_prefix(plain, head)
    if common == len(plain):
        return ""
    ends = [0, *_token_ends(tokenizer, plain)]
    tail = plain[ends[bisect.bisect_right(ends, common) - 1] :]
    return tail if tail.strip() and _is_trailer(tokenizer, tail, _special_ids(tokenizer)) else ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _completion_start(
    head: str, upto: str, prompt: str, last: dict, turn: dict, i: int, template: Template
) -> int:
    """Where turn i's own text starts in upto = render(messages[:i+1]) when upto does not start with its
    generation prompt head (Mistral v0.3 writes the system text only into a user turn that ends the
    conversation): just after the stretch of upto whose end is most like head's end (the longest common suffix;
    the latest such place). That stretch must reach past the generation prompt (head beyond prompt =
    render(messages[:i])) into the last prompt message, holding its text, and what follows it must hold the
    turn's own text; else the turn's context cannot be told and it is refused."""
    n = len(head)
    z = _z_function(head[::-1] + "\0" + upto[::-1])
    best, start = 0, -1
    for s in range(
        len(upto), 0, -1
    ):  # upto[:s] ends where head ends: its common suffix is z at len(upto) - s
        match = min(z[n + 1 + len(upto) - s], n)
        if match > best:
            best, start = match, s
    generation = n - _common_prefix(prompt, head)  # the generation prompt's length
    anchor = last.get("content")
    anchor = anchor.strip() if isinstance(anchor, str) else ""
    answer = turn.get("content")
    answer = answer.strip() if isinstance(answer, str) else ""
    if start < 0 or not anchor or anchor not in head[n - best : n - generation] or answer not in upto[start:]:
        kwargs = f" (chat_template_kwargs {json.dumps(template.kwargs)})" if template.kwargs else ""
        raise TemplateError(
            f"the chat template's generation prompt for turn {i + 1}{kwargs} is not how that turn starts when it "
            f"is rendered (the prompt ends {head[-40:]!r}, the rendering reads {upto[-40 - len(answer) :]!r}), so "
            "the context it is generated in cannot be told; reasoning given with a generation prompt that closes "
            "the think block (enable_thinking false) does this: leave one of them out"
        )
    return start


def _z_function(s: str) -> list[int]:
    """z[k]: the length of the longest common prefix of s and s[k:] (z[0] = len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def render_with_spans(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character spans of the trained turns it trains (those a template that
    rewrites the history trains in examples of their own are in plan_examples, not here)."""
    full = render_conversation(conv, tokenizer, template)
    spans = next((p.spans for p in plan_examples(conv, tokenizer, template) if p.text == full), [])
    return full, spans


def _token_ends(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sorted({e for _, e in offsets})


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
    return [_encode_piece(p, tokenizer) for p in plan_examples(conv, tokenizer, template)]


def _encode_piece(piece: Piece, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """Labels by the end-of-turn rule: every trained assistant turn trains its text after the generation prompt
    and exactly one closing token, which is
    - the last special token of the turn's own text (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
      <end_of_turn>, Mistral's </s>, Phi-3's <|end|>); what follows it (a newline) is not trained;
    - else the special token that follows the turn, after white space only (GLM and ChatGLM3: the next role's
      token, <|user|> or <|observation|>), the white space trained with it;
    - else, at the very end of the text, an appended EOS.
    Anything else (the turn's text followed by ordinary text, or holding the closer before its end) is refused
    with the reason: the model would not learn where its turn ends."""
    text = piece.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    starts = [s for s, _ in enc["offset_mapping"]]
    # a zero-width token counts for the character at s
    ends = [max(e, s + 1) for s, e in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    specials = _special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    turn_ends, closers = [], []
    for n, span in zip(piece.turns, piece.spans, strict=True):
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
    return Encoded(ids, labels, turn_ends, closers=closers, turns=list(piece.turns))


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
    turns = [enc.turns[k] for k in kept if k < len(enc.turns)]
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], turn_ends, True, closers, turns), True
