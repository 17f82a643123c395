"""The terminal chat: multi-turn, streamed, 'clear' and 'exit'."""

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
        result = generate_one(session, ids, options, on_text=_print_piece)
        if not result.stopped:  # max_new_tokens: say so rather than end mid-sentence (or mid-character)
            print(f" [cut at {result.produced} tokens]", end="")
        print(flush=True)
        reply = decode(session, result.ids)
        history.append(Message("assistant", reply))
        if session.raw:
            history.clear()


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)
