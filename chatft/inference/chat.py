"""The terminal chat: multi-turn, streamed, 'clear' and 'exit'. A reasoning model's reasoning is shown apart from
its answer: after `thinking: ` on a line of its own, dimmed on a terminal (chatft.inference.reasoning splits it)."""

from __future__ import annotations

import sys

from chatft.data.schema import Message
from chatft.inference.generation import (
    GenerationOptions,
    conversation_for,
    decode,
    generate_one,
    print_prompt,
    render_prompt,
)
from chatft.inference.loading import Session
from chatft.inference.reasoning import REASONING, ReasoningStream, prompt_opens_think, split_reasoning

DIM, PLAIN = "\x1b[2m", "\x1b[0m"
THINKING = "thinking: "


def chat(
    session: Session, options: GenerationOptions, system: str | None = None, tools: list | None = None
) -> int:
    """Multi-turn chat on the terminal, the answer streamed token by token (in whole characters; an answer
    cut by max_new_tokens ends with `[cut at N tokens]`). Lines come from stdin (a pipe works); `clear`
    forgets the history; `exit` or the end of the input ends (Ctrl-C too, with status 130)."""
    echo = not sys.stdin.isatty()  # piped input is not shown by the terminal: show it in the transcript
    note = "raw prompts: each line is answered on its own, no history; " if session.raw else ""
    print(f"Chat ({note}'clear' forgets the history, 'exit' ends).", flush=True)
    try:
        _chat_loop(session, options, system, tools, echo)
    except KeyboardInterrupt:
        print(flush=True)
        return 130
    return 0


def _chat_loop(
    session: Session, options: GenerationOptions, system: str | None, tools: list | None, echo: bool
) -> None:
    history: list[Message] = []
    while True:
        try:
            line = input("\nUser: ")
        except EOFError:
            print(flush=True)
            return
        if echo:
            print(line, flush=True)
        text = line.strip()
        if text == "exit":
            return
        if text == "clear":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append(Message("user", text))
        prompt_text, ids = render_prompt(session, conversation_for(session, history, system, tools))
        print_prompt(session, prompt_text)
        print("\nAssistant: ", end="", flush=True)
        opened = prompt_opens_think(prompt_text)
        shown = Shown(sys.stdout.isatty(), opened)
        result = generate_one(session, ids, options, on_text=shown.feed)
        shown.finish()
        if not result.stopped:  # max_new_tokens: say so rather than end mid-sentence (or mid-character)
            print(f" [cut at {result.produced} tokens]", end="")
        print(flush=True)
        reasoning, reply = split_reasoning(decode(session, result.ids), opened)
        # the template decides what of it the next prompt shows, as it did in training
        history.append(Message("assistant", reply, reasoning=reasoning or None))
        if session.raw:
            history.clear()


class Shown:
    """An answer printed as it comes, split by a ReasoningStream (opened: the prompt opened the think block): the
    reasoning after `thinking: ` (dimmed when dim), the answer on the next line."""

    def __init__(self, dim: bool, opened: bool = False) -> None:
        self.dim = dim
        self.stream = ReasoningStream(opened)
        self.thinking = False

    def feed(self, piece: str) -> None:
        self.add(self.stream.feed(piece))

    def finish(self) -> None:
        """The answer is over: what the stream held back, and the end of the reasoning's dimming."""
        self.add(self.stream.finish())
        self.end()

    def add(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if not text:
                continue
            if kind == REASONING and not self.thinking:
                self.thinking = True
                text = (DIM if self.dim else "") + THINKING + text
            elif kind != REASONING and self.thinking:
                self.end()
                text = "\n" + text
            print(text, end="", flush=True)

    def end(self) -> None:
        """The reasoning is over (an answer cut while thinking has none)."""
        if self.thinking and self.dim:
            print(PLAIN, end="", flush=True)
        self.thinking = False
