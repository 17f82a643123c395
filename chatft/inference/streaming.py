"""Streamed answer text: what of an answer may go out while the model is still writing it.

The generation hands out whole characters (generation.TextDeltas); here the text is cut at the first stop
string, and held back where it could still turn out to be a stop string or a tool call: a client must never
see `<tool_ca` arrive and then learn that it was a call, nor the first half of a stop string.
"""

from __future__ import annotations


class StreamText:
    """The answer as it may be streamed: cut at the first stop string, and never handing out text that could be
    the start of a stop string or of a tool call (hold). Leading white space is held too (the whole answer is
    stripped)."""

    def __init__(self, stops: list[str], hold: list[str], hold_all: bool = False) -> None:
        self.stops, self.hold, self.hold_all = stops, hold, hold_all
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was met
        self.held_from: int | None = None  # where a tool call starts: nothing from there is streamed

    def feed(self, piece: str) -> str:
        """The new text that may go out now that piece has come."""
        if self.stopped:
            return ""
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
        if self.hold_all:
            self.held_from = 0
        if self.held_from is None:
            starts = [i for i in (self.text.find(h) for h in self.hold) if i >= 0]
            self.held_from = min(starts) if starts else None
        end = self.held_from if self.held_from is not None else len(self.text)
        if not self.stopped:  # once stopped, nothing more comes that could complete a marker
            end = min(end, len(self.text) - _partial_tail(self.text, self.stops + self.hold))
        if not self.text[:end].strip():
            return ""
        if self.sent == 0:
            self.sent = len(self.text) - len(self.text.lstrip())
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def rest(self) -> str:
        """What was held back and is plain text after all (the answer is over)."""
        return self.text[self.sent :].rstrip() if self.text[self.sent :].strip() else ""


def _partial_tail(text: str, markers: list[str]) -> int:
    """The length of the longest end of text that is the start of a marker."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
