"""The terminal chat: multi-turn, streamed, 'clear' and 'exit'."""

from __future__ import annotations

import sys

from chatft.data.schema import Message
from chatft.inference.generation import (
    GenerationOptions,
    conversation_for,
    decode,
    generate,
    print_prompt,
    render_prompt,
)
from chatft.inference.loading import Session


def chat(
    session: Session, options: GenerationOptions, system: str | None = None, tools: list | None = None
) -> int:
    """Multi-turn chat on the terminal, the answer streamed token by token. Lines come from stdin (a pipe
    works); `clear` forgets the history; `exit` or the end of the input ends (Ctrl-C too, with status 130)."""
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
    from transformers import TextStreamer

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
        streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = decode(session, generate(session, [ids], options, streamer=streamer)[0])
        history.append(Message("assistant", reply))
        if session.raw:
            history.clear()
