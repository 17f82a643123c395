"""The examples a conversation trains as (plan_examples): each trained assistant turn in exactly the context the
template gives it when the model generates it, as templates.py's docstring tells. A template that renders every
turn the same once later turns follow gives one example, the whole conversation; one that rewrites the history
(Qwen3, Mistral) gives such turns examples of their own. Reasoning the template has no place for is refused here.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from chatft.data.rendering import (
    Template,
    TemplateError,
    _render,
    render_conversation,
    template_supports_tools,
)
from chatft.data.schema import Conversation


@dataclass
class Piece:
    """One training example's text: spans[k] = [start, end) characters of trained turn turns[k] (1-based among
    the conversation's trained turns), from the end of its generation prompt to the end of its own text."""

    text: str
    spans: list[tuple[int, int]]
    turns: list[int]


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
    uptos = {  # the last message's is the whole rendering
        i: full if i == len(msgs) - 1 else _render(tokenizer, template, msgs[: i + 1], tools, False)
        for i in trained
    }
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
    """The length of the longest common prefix of a and b (a binary search over prefix comparisons, which run
    in C: a character loop in Python costs more than the rendering on a chat turn)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
