"""Render a prompt exactly as training rendered it, and generate an answer to it.

Every prompt is rendered as in training: the template's message dicts through apply_chat_template with
add_generation_prompt=True, tokenized with no added special tokens; input-output records as raw text with the
tokenizer's own prefix tokens (BOS) and no markup. Generation stops at every end of turn (Session.stop_ids).
Greedy unless do_sample; a repetition_penalty applies to either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatft.data.schema import Conversation, Message
from chatft.data.templates import (
    NATIVE_TEMPLATES,
    Template,
    TemplateError,
    render_generation_prompt,
    with_prefix_tokens,
)
from chatft.inference.common import to_stderr
from chatft.inference.loading import Session
from chatft.inference.reasoning import prompt_opens_think, split_reasoning


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_time: float | None = None  # seconds; a generation that takes longer is cut
    repetition_penalty: float | None = None  # transformers' (>1 discourages repeats), greedy or sampled

    @classmethod
    def from_args(cls, args: Any) -> GenerationOptions:
        """The generation group of inference.py's command line."""
        return cls(
            args.max_new_tokens,
            args.do_sample,
            args.temperature,
            args.top_p,
            repetition_penalty=args.repetition_penalty,
        )


@dataclass
class Generated:
    """One prompt's answer. ids: the new ids, cut before the first stop token; produced: the tokens the model
    generated (a stop token included); stopped: whether it ended at a stop token (else it was cut, by
    max_new_tokens, max_time or the caller)."""

    ids: list[int]
    produced: int
    stopped: bool


def render_prompt(
    session: Session, conv: Conversation, template: Template | None = None
) -> tuple[str, list[int]]:
    """(the text the tokenizer encodes, the ids) of a conversation that ends where the model answers; template:
    the session's own unless given (the server's per-request chat_template_kwargs)."""
    tokenizer = session.tokenizer
    if conv.raw:
        text = conv.messages[-1].content
        return text, with_prefix_tokens(tokenizer, text)
    template = template or session.template
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
        max_time=options.max_time,
        repetition_penalty=(
            options.repetition_penalty if options.repetition_penalty is not None else own.repetition_penalty
        ),
    )
    if options.do_sample:
        config.temperature = options.temperature if options.temperature is not None else own.temperature
        config.top_p = options.top_p if options.top_p is not None else own.top_p
        config.top_k = own.top_k
    return config


def generate(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
) -> list[list[int]]:
    """The new ids of each prompt (left-padded into one batch), cut before the first stop token."""
    return [g.ids for g in generate_rows(session, prompts, options)]


def generate_one(
    session: Session,
    prompt: list[int],
    options: GenerationOptions,
    on_text: Callable[[str], Any] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> Generated:
    """One prompt's answer; on_text(piece) streams it as it comes, in whole characters (TextDeltas);
    stop_when() is asked after every token and ends the generation when it says so."""
    return generate_rows(session, [prompt], options, [Follow(None, on_text, stop_when)])[0]


@dataclass
class Follow:
    """What the caller wants of one prompt of a batch: its own token cap (default: options.max_new_tokens), its
    answer in pieces as they come (on_text, whole characters), and a way to end it early (stop_when, asked after
    every token)."""

    max_new_tokens: int | None = None
    on_text: Callable[[str], Any] | None = None
    stop_when: Callable[[], bool] | None = None


def generate_rows(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
    follows: list[Follow] | None = None,
) -> list[Generated]:
    """The answers of prompts generated together (left-padded into one batch), each followed as it asks."""
    import torch

    follows = follows or [Follow() for _ in prompts]
    rows = _Rows(session, follows, options.max_new_tokens)
    pad = session.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=session.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=session.device)
    config = generation_config(session, options)
    config.max_new_tokens = max(f.max_new_tokens or options.max_new_tokens for f in follows)
    with torch.inference_mode():
        session.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=[rows]
        )
    return [Generated(rows.ids[i], rows.produced[i], rows.stopped[i]) for i in range(len(prompts))]


class _Rows:
    """A stopping criterion for model.generate that follows every row of the batch token by token: its new ids
    up to its first stop token, the pieces of text it streams, and whether it is done (a stop token, its own cap,
    or its caller's stop_when). A row that is done gets padding from generate, which is never read."""

    def __init__(self, session: Session, follows: list[Follow], cap: int) -> None:
        self.follows, self.cap = follows, cap
        self.governor = session.governor
        self.stops = set(session.stop_ids)
        self.deltas = [TextDeltas(session.tokenizer) if f.on_text else None for f in follows]
        self.ids: list[list[int]] = [[] for _ in follows]
        self.produced = [0] * len(follows)
        self.stopped = [False] * len(follows)
        self.done = [False] * len(follows)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.governor is not None:  # between two tokens: the thread count may follow the machine's load
            self.governor.tick()
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.done[i]:
                continue
            follow = self.follows[i]
            self.produced[i] += 1
            if token in self.stops:
                self.done[i] = self.stopped[i] = True
                continue
            self.ids[i].append(token)
            if follow.on_text is not None and (piece := self.deltas[i].add([token])):
                follow.on_text(piece)
            if self.produced[i] >= (follow.max_new_tokens or self.cap) or (
                follow.stop_when and follow.stop_when()
            ):
                self.done[i] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class TextDeltas:
    """The text of ids given a few at a time, handed out in pieces that never end inside a character. A
    byte-level BPE (SmolLM2, Qwen, Llama-3) splits one CJK character over 2-3 tokens, and the first of them
    decode to U+FFFD: such an incomplete character is held back until the tokens that complete it come, and
    never handed out when they do not (an answer cut by max_new_tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters handed out

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        piece = whole[self.sent :]
        self.sent = max(self.sent, len(whole))
        return piece


def decode(session: Session, ids: list[int]) -> str:
    """The answer's text; a trailing U+FFFD (a multi-byte character cut by max_new_tokens) is dropped, so an
    answer never ends in a broken character."""
    return session.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


def answer(
    session: Session,
    options: GenerationOptions,
    prompt: str,
    system: str | None = None,
    tools: list | None = None,
) -> tuple[str, str]:
    """(reasoning, answer) to one prompt (reasoning "" when the model wrote none: chatft.inference.reasoning)."""
    conv = conversation_for(session, [Message("user", prompt)], system, tools)
    text, ids = render_prompt(session, conv)
    print_prompt(session, text)
    return split_reasoning(decode(session, generate(session, [ids], options)[0]), prompt_opens_think(text))


def print_prompt(session: Session, text: str) -> None:
    if session.show_prompt:
        to_stderr(f"--- prompt ---\n{text}\n--- end of prompt ---")
