"""The server's OpenAI shapes: a /v1/chat/completions body read into a ChatRequest (every problem an ApiError,
a 4xx in OpenAI's error shape, so that nothing a client sends gets a 500 or a traceback), and the answers
written back (a chat.completion, or chat.completion.chunk events).

The messages are read as training reads an OpenAI record, and the prompt rendered as in training, with the
request's chat_template_kwargs (vLLM's field) over the model's own. A reasoning model's reasoning goes back apart
from its answer, as vLLM and DeepSeek's API send it: message.reasoning_content, streamed as delta.reasoning_content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from chatft.data.formats import _openai_message
from chatft.data.schema import Conversation, Message, RecordError
from chatft.data.templates import Template, TemplateError, parse_chat_template_kwargs
from chatft.inference.generation import GenerationOptions, render_prompt
from chatft.inference.loading import Session
from chatft.inference.reasoning import prompt_opens_think

MAX_BODY = 4 << 20  # bytes of one request


@dataclass
class Limits:
    """max_new_tokens: the most tokens a request may ask for, and its default; max_time: seconds per
    generation; max_queue: requests admitted at once (generating + waiting); max_batch: requests generated
    together; defaults: the sampling of a request that names none.

    Here rather than in the scheduler because reading a request needs the caps and the defaults."""

    max_new_tokens: int = 512
    max_time: float = 120.0
    max_queue: int = 16
    max_batch: int = 8
    defaults: GenerationOptions = field(default_factory=GenerationOptions)


class ApiError(Exception):
    """A request the server refuses: status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------- requests


@dataclass
class ChatRequest:
    model: str
    session: Session
    prompt_ids: list[int]
    options: GenerationOptions
    stop: list[str]
    tools: bool  # tools were offered: look for tool calls in the answer
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    opened: bool = (
        False  # the prompt opened a think block (DeepSeek-R1): the answer starts inside the reasoning
    )

    @property
    def template_name(self) -> str | None:
        """The chat template's name: it decides the form the model writes tool calls in."""
        return self.session.template.name if self.session.template else None


async def read_json_body(request: Any) -> Any:
    """The parsed body of a Starlette request, refused (413) past MAX_BODY before it is all read when the
    client says its length, and after when it does not."""
    length = request.headers.get("content-length") or "0"
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def parse_chat_request(body: Any, models: dict[str, Session], limits: Limits) -> ChatRequest:
    """A /v1/chat/completions body, checked field by field (ApiError for the first problem), and its prompt
    rendered as in training."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model: required, the name of a served model (GET /v1/models)", "model")
    if name not in models:
        served = ", ".join(models)
        raise ApiError(
            404, f"model {name!r} is not served here; served: {served}", "model", "model_not_found"
        )
    session = models[name]
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only 1 answer per request is supported", "n")
    tools = _tools(body, session)
    conv = _conversation(body.get("messages"), tools, session)
    template = _template(body, session)
    try:
        text, ids = render_prompt(session, conv, template)
    except TemplateError as e:
        raise ApiError(400, f"messages: {e}", "messages") from e
    options = _sampling(body, limits)
    options.max_new_tokens = _max_tokens(body, len(ids), _context_length(session), limits)
    stream = _typed(body, "stream", bool, False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options: must be an object", "stream_options")
    include_usage = stream_options.get("include_usage", False) is True
    seed = _typed(body, "seed", int, None)
    return ChatRequest(
        name,
        session,
        ids,
        options,
        _stop(body),
        tools is not None,
        seed,
        stream,
        include_usage,
        prompt_opens_think(text),
    )


def _typed(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is a subclass of int in Python, but `true` is no number in JSON
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{key}: must be an integer, got {json.dumps(value)[:40]}", key)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"{key}: must be a number, got {json.dumps(value)[:40]}", key)
    if kind is bool and not isinstance(value, bool):
        raise ApiError(400, f"{key}: must be true or false, got {json.dumps(value)[:40]}", key)
    return value


def _tools(body: dict, session: Session) -> list | None:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "tools: must be a non-empty list of tool objects", "tools")
    if body.get("tool_choice") not in (None, "auto"):
        raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported", "tool_choice")
    if session.raw:
        raise ApiError(400, "tools: this model answers raw prompts (trained on input-output data)", "tools")
    return tools


def _template(body: dict, session: Session) -> Template | None:
    """The model's template with the request's chat_template_kwargs over its own (checked as
    --chat_template_kwargs is); None: the model's own."""
    given = body.get("chat_template_kwargs")
    if given is None:
        return None
    if isinstance(given, str):  # the command line's JSON text is no request's form
        raise ApiError(400, "chat_template_kwargs: must be an object", "chat_template_kwargs")
    try:
        kwargs = parse_chat_template_kwargs(given)
    except ValueError as e:
        message = str(e).replace("--chat_template_kwargs", "chat_template_kwargs")
        raise ApiError(400, message, "chat_template_kwargs") from None
    if not kwargs:
        return None
    if session.raw or session.template is None:
        raise ApiError(
            400,
            "chat_template_kwargs: this model answers raw prompts (no chat template)",
            "chat_template_kwargs",
        )
    return replace(session.template, kwargs={**session.template.kwargs, **kwargs})


def _conversation(messages: Any, tools: list | None, session: Session) -> Conversation:
    """The messages read as training reads an OpenAI record (tool calls, tool names from tool_call_id), and in
    an order a model can answer: system first, then a user message, the last one a user or tool message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", "messages")
    parsed = _messages(messages)
    roles = [m.role for m in parsed]
    first = 1 if roles[0] == "system" else 0
    if first == len(roles) or roles[first] != "user":
        raise ApiError(
            400, "messages: the conversation must start with a user message (after a system one)", "messages"
        )
    for i in range(first, len(roles)):
        if roles[i] == "tool" and not (roles[i - 1] == "tool" or parsed[i - 1].tool_calls):
            raise ApiError(
                400, f"messages[{i}]: a tool message must follow an assistant tool call", f"messages[{i}]"
            )
    if roles[-1] not in ("user", "tool"):
        raise ApiError(400, "messages: the last message must be a user or tool message", "messages")
    if session.raw:
        if roles[-1] != "user":
            raise ApiError(
                400, "messages: this model answers a raw prompt: end with a user message", "messages"
            )
        return Conversation([parsed[-1]], raw=True)
    return Conversation(parsed, tools=tools)


def _messages(messages: list) -> list[Message]:
    """Each message as training reads it; a record's error (with its field) becomes the request's."""
    parsed: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id → the tool's name, for the tool messages that answer
    for i, raw in enumerate(messages):
        item = _plain_content(raw, i)
        if isinstance(item, dict) and item.get("role") == "assistant":
            item = {**item, "loss": False}  # history, never trained: an empty answer is fine
        try:
            parsed.append(_openai_message(item, i, call_names))
        except RecordError as e:
            raise ApiError(400, str(e), e.field) from e
    return parsed


def _plain_content(raw: Any, index: int) -> Any:
    """A message whose content is a list of text parts, with that content as one string; OpenAI's newer
    "developer" role is the system message."""
    if isinstance(raw, dict) and raw.get("role") == "developer":
        raw = {**raw, "role": "system"}
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return raw
    texts = []
    for j, part in enumerate(raw["content"]):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            path = f"messages[{index}].content[{j}]"
            raise ApiError(400, f"{path}: only text parts are supported", path)
        texts.append(part["text"])
    return {**raw, "content": "".join(texts)}


def _sampling(body: dict, limits: Limits) -> GenerationOptions:
    temperature = _typed(body, "temperature", float, None)
    top_p = _typed(body, "top_p", float, None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature: must be between 0 and 2, got {temperature}", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p: must be greater than 0 and at most 1, got {top_p}", "top_p")
    options = replace(limits.defaults, max_time=limits.max_time)
    # OpenAI's temperature 0 means greedy; a request that names neither keeps the server's own sampling
    if temperature is not None:
        options.do_sample = temperature > 0
        options.temperature = temperature if temperature > 0 else None
    elif top_p is not None:
        options.do_sample = True
    if top_p is not None:
        options.top_p = top_p
    return options


def _max_tokens(body: dict, prompt_tokens: int, context: int | None, limits: Limits) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _typed(body, key, int, None)
    if asked is not None and not 1 <= asked <= limits.max_new_tokens:
        raise ApiError(400, f"{key}: must be between 1 and {limits.max_new_tokens}, got {asked}", key)
    if context is None:
        return asked or limits.max_new_tokens
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the messages take {prompt_tokens}"
            + (f" and max_tokens asks for {asked} more" if asked is not None else ""),
            "messages",
            "context_length_exceeded",
        )
    return min(asked or limits.max_new_tokens, room)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop: must be a string or a list of up to 4 non-empty strings", "stop")
    return stops


def _context_length(session: Session) -> int | None:
    config = session.model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


# ---------------------------------------------------------------------------------------------------- answers


@dataclass
class Reply:
    """One answer's identity (id, created, model), and the OpenAI bodies that carry it."""

    id: str
    created: int
    model: str

    def completion(
        self, content: str, calls: list[dict], finish: str, usage: dict, reasoning: str = ""
    ) -> dict:
        """The chat.completion of a whole answer; content null when the answer is only tool calls;
        reasoning_content when the model reasoned."""
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return self._body("chat.completion", [choice]) | {"usage": usage}

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        """A server-sent event: one chat.completion.chunk of a streamed answer."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return event(self._body("chat.completion.chunk", [choice]))

    def usage_chunk(self, usage: dict) -> str:
        """The last chunk when the client asked for stream_options.include_usage: no choices, the counts."""
        return event(self._body("chat.completion.chunk", []) | {"usage": usage})

    def _body(self, kind: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def event(body: dict) -> str:
    """A server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
