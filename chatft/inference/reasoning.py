"""A reasoning model's answer split into its reasoning and the answer proper: the one rule the terminal chat, batch
prediction and the server share.

- The text inside a leading <think>...</think> block is the reasoning, what follows it the answer (Qwen3, and the
  leading block training reads as reasoning, chatft.data.formats.split_think).
- When the generation prompt opened the block itself (DeepSeek-R1's template ends with `<think>\\n`), the model
  writes only its end: everything before the first </think> is the reasoning.
- A block never closed (the answer was cut while thinking) is all reasoning, with no answer yet.
- Anything else is all answer, with no reasoning. Both parts are stripped of white space at their ends.

The markers are read in the decoded text: Qwen3's and DeepSeek-R1's <think> tokens are not special tokens, so
decoding keeps them.
"""

from __future__ import annotations

from chatft.data.formats import THINK_CLOSE, THINK_OPEN

REASONING, ANSWER = "reasoning", "answer"


def prompt_opens_think(prompt: str) -> bool:
    """Whether a rendered generation prompt ends inside an open think block (DeepSeek-R1's `<think>\\n`); a block
    the prompt opens and closes (Qwen3 with enable_thinking false) leaves it closed."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a generated text; opened: the generation prompt opened the think block. The
    reasoning is "" when there is none."""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    elif not opened:
        return "", text.strip()
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE) :].strip()


class ReasoningStream:
    """split_reasoning for a text that comes in pieces: feed() hands out each new part of the reasoning or of the
    answer as soon as it cannot change any more (a `<thi` that may still open a block, a `</thi` that may still
    close it, and white space that may turn out to end a part are held back), so that the parts handed out, put
    together, are exactly split_reasoning of the whole text."""

    def __init__(self, opened: bool = False) -> None:
        self.opened = opened
        self.text = ""
        self.sent = {REASONING: 0, ANSWER: 0}

    def feed(self, piece: str, final: bool = False) -> list[tuple[str, str]]:
        """[(REASONING or ANSWER, new text), ...] that may go out now that piece has come; final: the text is
        complete, nothing is held back."""
        self.text += piece
        parts = self.whole() if final else self._settled()
        out = []
        for kind, text in zip((REASONING, ANSWER), parts, strict=True):
            if len(text) > self.sent[kind]:
                out.append((kind, text[self.sent[kind] :]))
                self.sent[kind] = len(text)
        return out

    def whole(self) -> tuple[str, str]:
        """(reasoning, answer) of the text so far, taken as complete."""
        return split_reasoning(self.text, self.opened)

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, now that the text is complete."""
        return self.feed("", final=True)

    def _settled(self) -> tuple[str, str]:
        """The reasoning and the answer as far as more text cannot change them."""
        body = self.text.lstrip()
        if THINK_OPEN.startswith(body):
            return "", ""  # a block may still open
        if body.startswith(THINK_OPEN):
            body = body[len(THINK_OPEN) :]
        elif not self.opened:
            return "", body.rstrip()
        end = body.find(THINK_CLOSE)
        if end >= 0:
            return body[:end].strip(), body[end + len(THINK_CLOSE) :].strip()
        return _without_partial(body, THINK_CLOSE).strip(), ""


def _without_partial(text: str, marker: str) -> str:
    """text without the longest end of it that is the start of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[:-n]
    return text
