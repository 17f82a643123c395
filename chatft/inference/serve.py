"""`inference.py --serve`: an OpenAI-compatible chat API and a chat page for one or several models, each loaded
exactly as inference.py loads it and prompted exactly as it was trained. This module is the web application
(routes, API key, startup); its parts:

- openai_schema.py: requests read and checked, OpenAI's error and answer shapes;
- scheduler.py: the queue, the batching generation thread, the limits on both;
- streaming.py: what of an answer may be streamed while it is written;
- toolcalls.py: tool calls read back from an answer.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages, tools, stream, max_tokens, temperature, top_p,
stop, seed, chat_template_kwargs; usage counts), GET /health, and the chat page at /.

- A generation is capped in tokens (max_new_tokens, also the most a request may ask for) and in time
  (max_time: the answer is cut, finish_reason "length"). At most max_queue requests are admitted; one more
  gets 503 with Retry-After.
- Every bad request is a 4xx JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}};
  nothing a client sends gets a 500 or a traceback.
- Streamed text never holds half a character (TextDeltas), nor the start of a stop string or of a tool call
  that is still being written.

Sampling: temperature 0 is greedy; a request that gives no temperature and no top_p decodes as the server was
started (greedy unless --do_sample). Tools are rendered as in training; a call the model writes in its trained
form (`<tool_call>` JSON, or ChatGLM3's `tool_call(...)` block) comes back as `tool_calls`, after a think block
too. A reasoning model's reasoning (reasoning.py) comes back apart: `message.reasoning_content`, streamed as
`delta.reasoning_content` before the answer's `delta.content`, as vLLM and DeepSeek's API send it; a request's
`chat_template_kwargs` (e.g. {"enable_thinking": false}) reach its prompt's rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.inference.common import InferError, to_stderr
from chatft.inference.generation import GenerationOptions
from chatft.inference.loading import ADAPTER_CONFIG, PEFT_KINDS, Session, load_session, read_adapter_config
from chatft.inference.openai_schema import (
    ApiError,
    ChatRequest,
    Limits,
    Reply,
    event,
    parse_chat_request,
    read_json_body,
)
from chatft.inference.scheduler import Busy, Job, Scheduler
from chatft.inference.streaming import StreamText
from chatft.inference.toolcalls import parse_tool_calls

# what callers of the server (tests, bench) import from here, wherever it is defined
__all__ = [
    "ApiError",
    "Limits",
    "Running",
    "Server",
    "StreamText",
    "check_host",
    "load_models",
    "parse_chat_request",
    "parse_tool_calls",
    "serve",
    "serve_main",
]

PAGE = Path(__file__).with_name("chat.html")
LOOPBACK = ("127.", "localhost", "::1")


class Server:
    """The served models, the limits, the API key, and the scheduler that generates their answers."""

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
        self.scheduler = Scheduler(limits, say)  # shares `limits`: a change to it reaches the queue
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.close()

    def check_key(self, headers: Any) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        # compared in constant time: how long a refusal takes tells nothing of the key
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    def admit(self, request: ChatRequest) -> Job:
        try:
            return self.scheduler.admit(request)
        except Busy as e:
            headers = {"Retry-After": str(e.retry_after)}
            raise ApiError(503, str(e), code="server_busy", kind="server_error", headers=headers) from None

    def health(self) -> dict:
        s = self.scheduler
        return {
            "status": "ok",
            "models": list(self.models),
            "generating": s.generating,
            "admitted": s.admitted,
            "max_queue": self.limits.max_queue,
            "max_new_tokens": self.limits.max_new_tokens,
            "served": s.served,
            "cancelled": s.cancelled,
            "batches": s.batches,
            "largest_batch": s.largest_batch,
            "auth": self.api_key is not None,
        }

    # --- the web application

    def app(self) -> FastAPI:
        app = FastAPI(title="chatft", docs_url=None, redoc_url=None, openapi_url=None)
        self._errors(app)

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))

        @app.get("/health")
        async def health() -> dict:
            return self.health()

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self.check_key(request.headers)
            data = [
                {"id": n, "object": "model", "created": self.created, "owned_by": "chatft"}
                for n in self.models
            ]
            return {"object": "list", "data": data}

        # the body is read raw (not a pydantic model) so that every problem gets its own OpenAI-shaped error:
        # FastAPI thus never validates a request, and has no RequestValidationError to answer
        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            self.check_key(request.headers)
            chat = parse_chat_request(await read_json_body(request), self.models, self.limits)
            job = self.admit(chat)
            reply = Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), chat.model)
            if chat.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                events = self._events(job, reply)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return JSONResponse(await self._complete(job, request, reply))

        return app

    def _errors(self, app: FastAPI) -> None:
        """Every error in OpenAI's shape: ours, Starlette's (unknown path, wrong method), and a bug's (500,
        logged, no traceback to the client)."""

        @app.exception_handler(ApiError)
        async def api_error(_request: Request, e: ApiError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(HTTPException)
        async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
            kind = "not_found" if e.status_code == 404 else "invalid_request_error"
            return JSONResponse(
                ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code
            )

        @app.exception_handler(Exception)
        async def unexpected(_request: Request, e: Exception) -> JSONResponse:
            self.say(f"error: {type(e).__name__}: {e}")
            return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), status_code=500)

    async def _complete(self, job: Job, request: Request, reply: Reply) -> dict:
        """The whole answer as one chat.completion, once generated; the client's leaving is checked every
        0.25 s meanwhile, so that nobody's answer is generated for nothing."""
        try:
            while True:
                try:
                    if await asyncio.wait_for(job.pieces.get(), 0.25) is None:
                        break
                except TimeoutError:
                    if await request.is_disconnected():
                        return {}  # nobody to answer; finally stops the generation
        finally:
            self.scheduler.release(job)  # the answer is over, or its client left
        if job.result is None:
            raise ApiError(500, "the generation failed", kind="server_error")
        content, calls, finish, reasoning = job.answer()
        return reply.completion(content, calls, finish, job.usage(), reasoning)

    async def _events(self, job: Job, reply: Reply) -> AsyncIterator[str]:
        """The answer as server-sent events: the role, the reasoning (delta.reasoning_content) and the text as
        they may be streamed, then what was held back (tool calls, or text that turned out plain), the finish
        reason, the usage if asked, [DONE]."""
        try:
            yield reply.chunk({"role": "assistant", "content": ""})
            while (piece := await job.pieces.get()) is not None:
                field_name, text = piece
                yield reply.chunk({field_name: text})
            if job.result is None:
                yield event(ApiError(500, "the generation failed", kind="server_error").body())
                return
            content, calls, finish, _ = job.answer()
            if calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                yield reply.chunk(delta | ({"content": content} if content and not job.text.sent else {}))
            elif rest := job.text.rest():
                yield reply.chunk({"content": rest})
            yield reply.chunk({}, finish)
            if job.request.include_usage:
                yield reply.usage_chunk(job.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.release(
                job
            )  # the client left mid-stream (or the answer is over): free its place now


# ---------------------------------------------------------------------------------------------------- running it


def check_host(host: str, api_key: str | None) -> None:
    if not host.startswith(LOOPBACK) and not api_key:
        raise InferError(
            f"--host {host} serves beyond this machine: give --api_key KEY (or CHATFT_API_KEY) so that only "
            "clients with the key are answered"
        )


def serve_main(args: argparse.Namespace) -> int:
    """inference.py --serve: load the models, then serve until Ctrl-C. On the CPU one ThreadGovernor for all
    the models, in the generation thread: as many torch threads as the machine leaves free (chatft.threads; on a
    2-core CPU that other work shares, two spin-waiting threads generated 6x slower than one, bench/RESULTS.md),
    or --threads."""
    models = load_models(args)
    shared = next((s.governor for s in models.values() if s.governor is not None), None)
    for session in models.values():
        session.governor = shared if session.governor is not None else None
    limits = Limits(
        args.max_new_tokens,
        args.max_time,
        args.max_queue,
        args.max_batch,
        GenerationOptions.from_args(args),
    )
    serve(Server(models, limits, args.api_key), args.host, args.port)
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
