"""`inference.py --serve`: an OpenAI-compatible chat API and a chat page for one or several models, each loaded
exactly as inference.py loads it and prompted exactly as it was trained.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages, tools, stream, max_tokens, temperature, top_p,
stop, seed; usage counts), GET /health, and the chat page at /.

How requests are served:
- One generation thread takes the oldest waiting request and, with it, the waiting requests that can share its
  generation (same model and sampling, no seed; up to max_batch) as one left-padded batch: on this 2-core CPU
  a batch of 8 answers generates about 3x the tokens per second of one at a time (bench/serve.py). At most
  max_queue requests are admitted (generating and waiting); one more gets 503 with Retry-After.
- A generation is capped in tokens (max_new_tokens, also the most a request may ask for) and in time
  (max_time: the answer is cut, finish_reason "length").
- A client that disconnects stops its generation at the next token; a waiting one leaves the queue at once.
- Every bad request is a 4xx JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}};
  nothing a client sends gets a 500 or a traceback.
- Streamed text never holds half a character (TextDeltas), nor the start of a stop string or of a tool call
  that is still being written.

Sampling: temperature 0 is greedy; a request that gives no temperature and no top_p decodes as the server was
started (greedy unless --do_sample). Tools are rendered as in training; a call the model writes in its trained
form (`<tool_call>` JSON, or ChatGLM3's `tool_call(...)` block) comes back as `tool_calls`.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chatft.data.formats import _openai_message
from chatft.data.schema import Conversation, Message, RecordError
from chatft.data.templates import TemplateError
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.inference.common import InferError, to_stderr
from chatft.inference.generation import Follow, Generated, GenerationOptions, generate_rows, render_prompt
from chatft.inference.loading import ADAPTER_CONFIG, PEFT_KINDS, Session, load_session, read_adapter_config

PAGE = Path(__file__).with_name("chat.html")
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
CHATGLM3_CALL = re.compile(r"^\s*([\w.\-]+)\s*\n```python\n(.*?)\n```\s*$", re.S)
MAX_BODY = 4 << 20  # bytes of one request
LOOPBACK = ("127.", "localhost", "::1")
GATHER_S = 0.05  # how long after its first request a batch waits for more, when several clients are asking


@dataclass
class Limits:
    """max_new_tokens: the most tokens a request may ask for, and its default; max_time: seconds per
    generation; max_queue: requests admitted at once (generating + waiting); max_batch: requests generated
    together; defaults: the sampling of a request that names none."""

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
    try:
        _, ids = render_prompt(session, conv)
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
        name, session, ids, options, _stop(body), tools is not None, seed, stream, include_usage
    )


def _typed(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
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


def _conversation(messages: Any, tools: list | None, session: Session) -> Conversation:
    """The messages read as training reads an OpenAI record (tool calls, tool names from tool_call_id), and in
    an order a model can answer: system first, then a user message, the last one a user or tool message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", "messages")
    parsed: list[Message] = []
    call_names: dict[str, str] = {}
    for i, raw in enumerate(messages):
        item = _plain_content(raw, i)
        if isinstance(item, dict) and item.get("role") == "assistant":
            item = {**item, "loss": False}  # history, never trained: an empty answer is fine
        try:
            parsed.append(_openai_message(item, i, call_names))
        except RecordError as e:
            raise ApiError(400, str(e), e.field) from e
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
        if not self.stopped:
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


def parse_tool_calls(text: str, template_name: str | None) -> tuple[str, list[dict]]:
    """(content, tool_calls) of an answer: the calls written in the trained form come out as OpenAI tool calls;
    an answer whose calls do not all parse stays text."""
    if template_name == "chatglm3":
        match = CHATGLM3_CALL.match(text)
        call = _chatglm3_call(match.group(1), match.group(2)) if match else None
        return ("", [call]) if call else (text.strip(), [])
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except ValueError:
            return text.strip(), []
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return text.strip(), []
        arguments = data.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(_tool_call(data["name"], arguments))
    return TOOL_CALL.sub("", text).strip(), calls


def _chatglm3_call(name: str, code: str) -> dict | None:
    try:
        node = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and not node.args):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError):
        return None
    return _tool_call(name, json.dumps(arguments, ensure_ascii=False))


def _tool_call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


@dataclass
class Job:
    """A request admitted: its pieces of text go to `pieces` (then None), `cancel` stops it."""

    request: ChatRequest
    pieces: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    text: StreamText | None = None
    result: Generated | None = None
    started: float = 0.0
    finished: float = 0.0

    def batch_key(self) -> tuple | None:
        """Jobs with the same key can be generated in one batch; None: alone (a seed is for one answer)."""
        r = self.request
        if r.seed is not None:
            return None
        return (
            id(r.session),
            r.options.do_sample,
            r.options.temperature,
            r.options.top_p,
            r.options.max_time,
        )


# ---------------------------------------------------------------------------------------------------- the server


class Server:
    """The served models, the limits, the generation thread and its queue, the count of admitted requests."""

    def __init__(
        self,
        models: dict[str, Session],
        limits: Limits,
        api_key: str | None = None,
        say: Callable[[str], Any] = to_stderr,
    ) -> None:
        if not models:
            raise InferError("no model to serve")
        self.models, self.limits, self.api_key, self.say = models, limits, api_key, say
        self.pending: deque[Job] = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.admitted = 0  # changed in the event loop only
        self.generating = 0  # the size of the batch being generated
        self.served = self.cancelled = self.batches = self.largest_batch = 0
        self.seconds_per_answer = 1.0  # a running mean, for Retry-After
        self.concurrent_at = -1e9  # when two requests were last admitted at once
        self.created = int(time.time())
        self.worker = threading.Thread(target=self._work, name="chatft-generate", daemon=True)
        self.worker.start()

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()

    # --- admission and generation

    def admit(self, request: ChatRequest) -> Job:
        if self.admitted >= self.limits.max_queue:
            wait = max(1, round(self.seconds_per_answer * self.admitted / max(1, self.limits.max_batch)))
            raise ApiError(
                503,
                f"the server is busy ({self.admitted} requests admitted, at most {self.limits.max_queue}); "
                f"retry in {wait} s",
                code="server_busy",
                kind="server_error",
                headers={"Retry-After": str(wait)},
            )
        job = Job(request, asyncio.Queue(), asyncio.get_running_loop(), arrived=time.monotonic())
        self.admitted += 1
        if self.admitted > 1:
            self.concurrent_at = job.arrived  # several clients now: batches gather (see _work)
        with self.wake:
            self.pending.append(job)
            self.wake.notify()
        return job

    def release(self, job: Job) -> None:
        """In the event loop, when a client has its answer or is gone: the job stops at its next token, and a
        job still waiting leaves the queue now."""
        job.cancel.set()
        with self.wake:
            waiting = job in self.pending
            if waiting:
                self.pending.remove(job)
        if waiting:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        """In the event loop: the job is over (answered, cancelled or failed)."""
        self.admitted -= 1
        if job.cancel.is_set() and (job.result is None or not job.result.stopped):
            self.cancelled += 1
        if job.result is not None:
            self.served += 1
            self.seconds_per_answer = 0.8 * self.seconds_per_answer + 0.2 * (job.finished - job.started)
        job.pieces.put_nowait(None)

    def _work(self) -> None:
        """The generation thread: the oldest waiting job, batched with the waiting jobs that can share its
        generation (same model and sampling, no seed; up to max_batch), until the server closes."""
        while True:
            with self.wake:
                while not self.pending and not self.closing:
                    self.wake.wait()
                if self.closing:
                    return
                if time.monotonic() - self.concurrent_at < 5:
                    # clients that ask at once arrive a few milliseconds apart: wait for them a little, or
                    # the batches of clients asking in a loop stay split (1 + 3 instead of 4); one client alone
                    # never waits
                    deadline = self.pending[0].arrived + GATHER_S
                    while len(self.pending) < self.limits.max_batch and not self.closing:
                        if (left := deadline - time.monotonic()) <= 0:
                            break
                        self.wake.wait(left)
                if self.closing:
                    return
                batch = self._take()
            if batch:
                try:
                    self._generate(batch)
                except (
                    Exception
                ) as e:  # a bug or a fault of the model: its clients get an error, others go on
                    self.say(f"generation failed: {type(e).__name__}: {e}")
                    for job in batch:
                        job.result = None
                for job in batch:
                    job.loop.call_soon_threadsafe(self._finish, job)

    def _take(self) -> list[Job]:
        gone = [job for job in self.pending if job.cancel.is_set()]  # their clients left while they waited
        for job in gone:
            self.pending.remove(job)
            job.loop.call_soon_threadsafe(self._finish, job)
        if not self.pending:
            return []
        first = self.pending.popleft()
        batch, key = [first], first.batch_key()
        if key is not None:
            for job in list(self.pending):
                if len(batch) >= self.limits.max_batch:
                    break
                if job.batch_key() == key:
                    self.pending.remove(job)
                    batch.append(job)
        return batch

    def _generate(self, batch: list[Job]) -> None:
        """In the generation thread: the batch's answers, each job's pieces handed to its event loop as they
        come."""
        first = batch[0].request
        if first.seed is not None:
            from transformers import set_seed

            set_seed(first.seed)
        follows = []
        for job in batch:
            request = job.request
            # a ChatGLM3 call starts with the tool's name, so nothing tells it from text: hold the whole answer
            glm = request.tools and request.session.template and request.session.template.name == "chatglm3"
            job.text = StreamText(request.stop, [TOOL_CALL_OPEN] if request.tools else [], bool(glm))
            follows.append(Follow(request.options.max_new_tokens, self._streamer(job), self._stopper(job)))
        self.generating = len(batch)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        started = time.monotonic()
        try:
            prompts = [job.request.prompt_ids for job in batch]
            results = generate_rows(first.session, prompts, first.options, follows)
        finally:
            self.generating = 0
        for job, result in zip(batch, results, strict=True):
            job.result, job.started, job.finished = result, started, time.monotonic()

    @staticmethod
    def _streamer(job: Job) -> Callable[[str], None]:
        def on_text(piece: str) -> None:
            if out := job.text.feed(piece):
                job.loop.call_soon_threadsafe(job.pieces.put_nowait, out)

        return on_text

    @staticmethod
    def _stopper(job: Job) -> Callable[[], bool]:
        return lambda: job.cancel.is_set() or job.text.stopped

    def answer(self, job: Job) -> tuple[str, list[dict], str]:
        """(content, tool_calls, finish_reason) of a finished job."""
        text = job.text.text if job.text else ""
        if job.request.tools:
            content, calls = parse_tool_calls(text, job.request.session.template.name)
            if calls:
                return content, calls, "tool_calls"
        finished = job.result is not None and (job.result.stopped or job.text.stopped)
        return text.strip(), [], "stop" if finished else "length"

    def usage(self, job: Job) -> dict:
        prompt, completion = len(job.request.prompt_ids), job.result.produced if job.result else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def check_key(self, headers: Any) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    # --- the web application

    def app(self) -> Any:
        app = FastAPI(title="chatft", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request: Request, e: ApiError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(HTTPException)
        async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
            kind = "not_found" if e.status_code == 404 else "invalid_request_error"
            return JSONResponse(
                ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code
            )

        @app.exception_handler(RequestValidationError)
        async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
            return JSONResponse(ApiError(400, "invalid request").body(), status_code=400)

        @app.exception_handler(Exception)
        async def unexpected(_request: Request, e: Exception) -> JSONResponse:
            self.say(f"error: {type(e).__name__}: {e}")
            return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), status_code=500)

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))

        @app.get("/health")
        async def health() -> dict:
            return {
                "status": "ok",
                "models": list(self.models),
                "generating": self.generating,
                "admitted": self.admitted,
                "max_queue": self.limits.max_queue,
                "max_new_tokens": self.limits.max_new_tokens,
                "served": self.served,
                "cancelled": self.cancelled,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
                "auth": self.api_key is not None,
            }

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self.check_key(request.headers)
            data = [
                {"id": n, "object": "model", "created": self.created, "owned_by": "chatft"}
                for n in self.models
            ]
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            self.check_key(request.headers)
            body = await _json_body(request)
            chat = parse_chat_request(body, self.models, self.limits)
            job = self.admit(chat)
            reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if chat.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                events = self._events(job, reply_id, created)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return JSONResponse(await self._complete(job, request, reply_id, created))

        return app

    async def _complete(self, job: Job, request: Any, reply_id: str, created: int) -> dict:
        try:
            while True:
                try:
                    if await asyncio.wait_for(job.pieces.get(), 0.25) is None:
                        break
                except TimeoutError:
                    if await request.is_disconnected():
                        return {}  # nobody to answer; finally stops the generation
        finally:
            self.release(job)  # the answer is over, or its client left
        if job.result is None:
            raise ApiError(500, "the generation failed", kind="server_error")
        content, calls, finish = self.answer(job)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": job.request.model,
            "choices": [choice],
            "usage": self.usage(job),
        }

    async def _events(self, job: Job, reply_id: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                    "model": job.request.model, "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await job.pieces.get()) is not None:
                yield chunk({"content": piece})
            if job.result is None:
                error = ApiError(500, "the generation failed", kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            content, calls, finish = self.answer(job)
            if calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                yield chunk(delta | ({"content": content} if content and not job.text.sent else {}))
            elif rest := job.text.rest():
                yield chunk({"content": rest})
            yield chunk({}, finish)
            if job.request.include_usage:
                body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                        "model": job.request.model, "choices": [], "usage": self.usage(job)}  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.release(job)  # the client left mid-stream (or the answer is over): free its place now


async def _json_body(request: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------------- running it


def check_host(host: str, api_key: str | None) -> None:
    if not host.startswith(LOOPBACK) and not api_key:
        raise InferError(
            f"--host {host} serves beyond this machine: give --api_key KEY (or CHATFT_API_KEY) so that only "
            "clients with the key are answered"
        )


def serve_main(args: argparse.Namespace) -> int:
    """inference.py --serve: load the models, then serve until Ctrl-C. One torch thread unless --threads says
    otherwise: on a 2-core CPU that other work shares, one thread generated about 6x the tokens/s of two
    (bench/RESULTS.md)."""
    if args.threads is None:
        import torch

        torch.set_num_threads(1)
    limits = Limits(
        args.max_new_tokens,
        args.max_time,
        args.max_queue,
        args.max_batch,
        GenerationOptions(args.max_new_tokens, args.do_sample, args.temperature, args.top_p),
    )
    serve(Server(load_models(args), limits, args.api_key), args.host, args.port)
    return 0


def load_models(args: argparse.Namespace, say: Callable[[str], Any] = to_stderr) -> dict[str, Session]:
    """The served models by name: --serve_model NAME=PATH each (a model folder, a LoRA adapter or a P-Tuning
    checkpoint, told apart by its adapter_config.json), else the one model of --model/--adapter/--pt-checkpoint
    named after its folder. Each is loaded as inference.py loads it."""
    if not args.serve_model:
        path = args.adapter or args.pt_checkpoint or args.model or str(DEFAULT_MODEL_DIR)
        return {Path(path).resolve().name: load_session(args, say)}
    specs: dict[str, argparse.Namespace] = {}
    for spec in args.serve_model:
        name, _, path = spec.partition("=")
        if not re.fullmatch(r"[\w.\-:]+", name) or not path:
            raise InferError(f"--serve_model {spec}: expected NAME=PATH, NAME of letters, digits, . _ - :")
        if name in specs:
            raise InferError(f"--serve_model {spec}: the name {name} is given twice")
        kind = "model"
        if (Path(path) / ADAPTER_CONFIG).is_file():
            kind = PEFT_KINDS.get(read_adapter_config(path, "--serve_model").get("peft_type"), "model")
        folders = {"model": args.model, "adapter": None, "pt_checkpoint": None}
        folders[{"model": "model", "lora": "adapter", "ptuning": "pt_checkpoint"}[kind]] = path
        specs[name] = argparse.Namespace(**{**vars(args), **folders})
    return {name: load_session(ns, say) for name, ns in specs.items()}


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    check_host(host, server.api_key)
    names = ", ".join(server.models)
    server.say(
        f"serving {names} at http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C stops)"
    )
    config = uvicorn.Config(
        server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2
    )
    try:
        uvicorn.Server(config).run()
    finally:
        server.close()


class Running:
    """A server on a free port of 127.0.0.1, in a background thread (for tests and benchmarks): `url`, `stop()`;
    a context manager."""

    def __init__(self, server: Server, host: str = "127.0.0.1") -> None:
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = server
        config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=1)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.server.close()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
