"""The Ollama Modelfile beside a GGUF: FROM, a TEMPLATE in Ollama's (Go) template syntax that renders what the
training rendered, and a PARAMETER stop per end-of-turn token.

The chat template is not parsed: its layout is read off its renderings. chatft renders a conversation of
marker contents through the model's template (the very rendering training used) and reads each role's text
before and after the content, the text before the first message, a default system message the template adds
when there is none, and the generation prompt. The Go template is written from that layout, then rendered
(chatft.export.gotemplate) against the chat template on several conversations; any difference means the
template has a layout this cannot express, and the Modelfile is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatft.data.schema import Conversation, Message
from chatft.data.templates import TemplateError
from chatft.export import first_difference
from chatft.export.gotemplate import GoTemplateError, render

ROLES = ("system", "user", "assistant", "tool")
# A conversation rendered either as training renders it (False) or as inference does, up to the answer (True).
Renderer = Callable[[Conversation, bool], str]


class ModelfileError(ValueError):
    """The chat template cannot be written in Ollama's template syntax (explained in one line)."""


@dataclass
class Layout:
    """Literal text around each role's content; prefix before the first message; generation after the last."""

    prefix: str
    around: dict[str, tuple[str, str]]
    generation: str
    default_system: str | None = None
    notes: list[str] = field(default_factory=list)


def _m(role: str, content: str) -> Message:
    return Message(role, content)


def _split(block: str, marker: str, what: str) -> tuple[str, str]:
    if block.count(marker) != 1:
        raise ModelfileError(f"the chat template does not render {what}'s content once, as it was given")
    before, after = block.split(marker)
    return before, after


def _delta(render_full: Callable[[list[Message]], str], messages: list[Message], what: str) -> str:
    """The text the last message adds to the rendering of the ones before it."""
    head, whole = render_full(messages[:-1]), render_full(messages)
    if not whole.startswith(head):
        raise ModelfileError(f"the chat template renders earlier turns differently once {what} follows")
    return whole[len(head) :]


def probe_layout(renderer: Renderer) -> Layout:
    def full(messages: list[Message]) -> str:
        return renderer(Conversation(messages), False) if messages else ""

    s, s2, u1, a1, u2, a2, t1 = (f"chatftmark{i}" for i in range(7))
    conv = [_m("system", s), _m("user", u1), _m("assistant", a1), _m("user", u2), _m("assistant", a2)]
    around = {
        "user": _split(_delta(full, conv[:4], "a user turn"), u2, "a user turn"),
        "assistant": _split(_delta(full, conv[:3], "an assistant turn"), a1, "an assistant turn"),
    }
    if _split(_delta(full, conv, "an assistant turn"), a2, "an assistant turn") != around["assistant"]:
        raise ModelfileError("the chat template renders later assistant turns differently from the first")
    if _split(_delta(full, conv[:2], "a user turn"), u1, "a user turn") != around["user"]:
        raise ModelfileError(
            "the chat template renders the first user turn after a system message differently"
        )
    mid = [_m("user", u1), _m("assistant", a1), _m("system", s2)]
    try:  # a template that refuses a system message after the first turn raises an error of its own choice
        around["system"] = _split(_delta(full, mid, "a system message"), s2, "a system message")
    except Exception as e:
        raise ModelfileError(f"cannot read how the chat template renders a system message ({e})") from e
    before_system = _split(full(conv[:1]), s, "a system message")[0]
    if not before_system.endswith(around["system"][0]):
        raise ModelfileError("the chat template renders a first system message differently from a later one")
    layout = Layout(before_system[: len(before_system) - len(around["system"][0])], around, "")
    head = _split(full([_m("user", u1)]), u1, "a user turn")[0]
    default = head[len(layout.prefix) : len(head) - len(around["user"][0])]
    if not head.startswith(layout.prefix) or not head.endswith(around["user"][0]):
        raise ModelfileError(
            "the chat template renders a conversation without a system message in another layout"
        )
    if default:
        pre, post = around["system"]
        if not (default.startswith(pre) and default.endswith(post)):
            raise ModelfileError(
                "the chat template adds text of its own before a conversation with no system message"
            )
        layout.default_system = default[len(pre) : len(default) - len(post)]
    ask = Conversation(conv[:4])
    generation, training = renderer(ask, True), full(conv[:4])
    if not generation.startswith(training):
        raise ModelfileError("the chat template's generation prompt changes the turns before it")
    layout.generation = generation[len(training) :]
    try:
        tool = _delta(full, [_m("user", u1), _m("assistant", a1), _m("tool", t1)], "a tool result")
        around["tool"] = _split(tool, t1, "a tool result")
    except Exception as e:  # any failure only means tool results are left out
        layout.notes.append(f"tool results are not translated ({str(e).splitlines()[0][:120]})")
    return layout


def _literal(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise ModelfileError(
            "the chat template's own text contains '{{' or '\"\"\"', which a Modelfile cannot quote"
        )
    return text


def go_template(layout: Layout, drop_prefix: str = "") -> str:
    """The Ollama TEMPLATE for layout. drop_prefix: text at the start of the prefix the runtime adds itself
    (a BOS token llama.cpp puts in front of every prompt)."""
    parts = [_literal(layout.prefix[len(drop_prefix) :]), "{{ range $i, $m := .Messages }}"]
    if layout.default_system is not None:
        pre, post = layout.around["system"]
        block = _literal(pre + layout.default_system + post)
        parts.append('{{ if and (eq $i 0) (ne $m.Role "system") }}' + block + "{{ end }}")
    keyword = "if"
    for role in ROLES:
        if role in layout.around:
            pre, post = layout.around[role]
            parts.append(
                f'{{{{ {keyword} eq $m.Role "{role}" }}}}{_literal(pre)}{{{{ $m.Content }}}}{_literal(post)}'
            )
            keyword = "else if"
    parts.append("{{ end }}")
    parts.append(
        '{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
        + _literal(layout.generation)
        + "{{ end }}{{ end }}"
    )
    return "".join(parts)


def ollama_messages(conv: Conversation) -> dict:
    return {"Messages": [{"Role": m.role, "Content": m.content} for m in conv.messages]}


def check_template(
    template: str, renderer: Renderer, conversations: list[Conversation], drop_prefix: str = ""
) -> int:
    """Render template and the chat template on each conversation (to the answer when it ends on a user or
    tool turn, else whole, as training renders it); ModelfileError at the first difference. Returns how many."""
    for conv in conversations:
        ask = conv.messages[-1].role != "assistant"
        expected = renderer(conv, ask)
        if drop_prefix and expected.startswith(drop_prefix):
            expected = expected[len(drop_prefix) :]
        try:
            got = render(template, ollama_messages(conv))
        except GoTemplateError as e:
            raise ModelfileError(f"the translated template does not render: {e}") from e
        if got != expected:
            at = first_difference(got, expected)
            raise ModelfileError(
                f"the translated template renders {got[at : at + 40]!r} where the chat template renders "
                f"{expected[at : at + 40]!r} (character {at} of a {len(conv.messages)}-message conversation)"
            )
    return len(conversations)


def check_conversations(conversations: list[Conversation]) -> list[Conversation]:
    """The conversations a translated template is checked on: each as it is, without its system message, and
    ending on its first assistant turn; one whose texts start and end with white space (a template that trims
    content cannot be written in Go's template syntax, which has no trim)."""
    out: list[Conversation] = []
    for conv in conversations:
        out.append(conv)
        without = [m for m in conv.messages if m.role != "system"]
        if len(without) != len(conv.messages):
            out.append(Conversation(without))
        first = next((i for i, m in enumerate(conv.messages) if m.role == "assistant"), None)
        if first is not None:
            out.append(Conversation(conv.messages[: first + 1]))
    padded = [
        _m("system", " be brief \n"),
        _m("user", "\n hi there  "),
        _m("assistant", "  hello \n"),
        _m("user", " ok "),
    ]
    return [*out, Conversation(padded)]


TOOL_CONVERSATIONS = [
    Conversation([_m("user", "weather in Paris?"), _m("assistant", "calling it"), _m("tool", '{"sunny": true}'),
                  _m("user", "so?")]),
    Conversation([_m("user", "and Rome, Oslo?"), _m("assistant", "calling both"), _m("tool", '{"rain": 1}'),
                  _m("tool", '{"snow": 2}'), _m("user", "thanks")]),
]  # fmt: skip


def translate(
    renderer: Renderer, conversations: list[Conversation], bos: str | None
) -> tuple[str, int, list[str]]:
    """(the Ollama TEMPLATE, how many conversations it was checked on, notes) for the chat template behind
    renderer; ModelfileError when it cannot be written. bos: the BOS text the runtime puts before every prompt
    (a tokenizer that adds BOS), left out of TEMPLATE when the chat template writes it too."""
    try:
        layout = probe_layout(renderer)
        drop = bos if bos and layout.prefix.startswith(bos) else ""
        if drop:
            layout.notes.append(
                f"{drop} is left out of TEMPLATE: llama.cpp puts it before every prompt itself."
            )
        if "tool" in layout.around:
            try:
                check_template(go_template(layout, drop), renderer, TOOL_CONVERSATIONS, drop)
            except ModelfileError as e:
                del layout.around["tool"]
                layout.notes.append(f"tool results are not translated: {e}")
        if "tool" in layout.around:
            layout.notes.append("tool results render as training renders them without tool definitions; tool "
                                "definitions (.Tools) and assistant tool calls are not translated")  # fmt: skip
        template = go_template(layout, drop)
        checks = check_conversations(conversations) + (TOOL_CONVERSATIONS if "tool" in layout.around else [])
        return template, check_template(template, renderer, checks, drop), layout.notes
    except TemplateError as e:
        raise ModelfileError(str(e)) from e


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(gguf_file: Path, template: str, stops: list[str], comments: list[str]) -> str:
    lines = [f"# {c}" for c in comments]
    lines.append(f"FROM ./{gguf_file.name}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    return "\n".join(lines) + "\n"


RAW_TEMPLATE = "{{ .Prompt }}"
