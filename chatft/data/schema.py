"""The canonical data model every input format is read into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    """One turn. role "tool" is an observation (a tool's result), never trained.

    loss: None means the default (assistant turns trained, everything else not); an explicit value wins for
    assistant turns. Readers reject `loss: true` on other roles, so `trained` never has to guess.
    reasoning: an assistant turn's reasoning trace (OpenAI's `reasoning_content`, or a leading <think> block of
    its content), given to the chat template as the message's `reasoning_content`; None: none given.
    """

    role: str
    content: str
    loss: bool | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    name: str | None = None
    reasoning: str | None = None

    @property
    def trained(self) -> bool:
        if self.role != "assistant":
            return False
        return True if self.loss is None else self.loss


@dataclass
class Conversation:
    """messages in order; tools: the tool definitions (any JSON) the template renders; raw: input-output
    data (one user prompt, one assistant response) rendered with no chat markup at all."""

    messages: list[Message]
    tools: Any = None
    raw: bool = False


@dataclass(frozen=True)
class Problem:
    """A located validation error. line: the line of a .jsonl file, or the 1-based element of a .json array."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class RecordError(ValueError):
    """Raised by a reader for one bad record; `field` is a path into the record like `conversations[2].role`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
