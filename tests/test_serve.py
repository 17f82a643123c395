"""inference.py --serve: the OpenAI-compatible API driven by the official `openai` client (and raw HTTP for what a
client library would not send), on tiny byte-level models served in this process (conftest.served)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import WEATHER_TOOLS

from chatft.data.schema import Conversation, Message
from chatft.inference.generation import GenerationOptions, answer, generate_one, render_prompt
from chatft.inference.serve import (
    ApiError,
    Limits,
    Running,
    Server,
    StreamText,
    check_host,
    parse_chat_request,
    parse_tool_calls,
)

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]


def client(running, **kw) -> openai.OpenAI:
    kw = {"api_key": "unused", "max_retries": 0, "timeout": 30, **kw}
    return openai.OpenAI(base_url=running.url + "/v1", **kw)


def http(
    running, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None
):
    """(status, headers, parsed JSON body) of a raw request."""
    request = urllib.request.Request(running.url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def post(running, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http(running, "/v1/chat/completions", data, {"Content-Type": "application/json"}, **kw)


def health(running) -> dict:
    return http(running, "/health")[2]


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def slow(served, monkeypatch):
    """The base model takes >= 20 ms per token (a long answer takes seconds)."""
    model = served.server.models["base"].model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)


# ---------------------------------------------------------------------------------------------------- answers


def test_models_and_health(served):
    assert [m.id for m in client(served).models.list()] == ["tuned", "base"]
    status = health(served)
    assert status["status"] == "ok" and status["models"] == ["tuned", "base"] and status["admitted"] == 0


def test_an_answer_is_what_inference_py_answers_with_usage(served):
    reply = client(served).chat.completions.create(model="tuned", messages=HI)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "hello there!"
    assert choice.finish_reason == "stop" and reply.object == "chat.completion" and reply.model == "tuned"
    session = served.server.models["tuned"]
    _, ids = render_prompt(session, Conversation([Message("user", "hi")]))
    # same loading, same prompt rendering: the answer of inference.py --prompt, token for token
    assert answer(session, GenerationOptions(200), "hi") == ("", "hello there!")  # (reasoning, answer)
    assert reply.usage.prompt_tokens == len(ids) == 21
    assert reply.usage.completion_tokens == len(b"hello there!") + 1  # and <|im_end|>
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_system_developer_and_text_parts_are_read_as_training_reads_them(served):
    c = client(served)
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert c.chat.completions.create(model="tuned", messages=parts).usage.prompt_tokens == 21  # "hi"
    system = c.chat.completions.create(model="tuned", messages=[{"role": "system", "content": "ok"}, *HI])
    developer = c.chat.completions.create(
        model="tuned", messages=[{"role": "developer", "content": "ok"}, *HI]
    )
    # + <|im_start|>system\nok<|im_end|>\n: 12 byte-level tokens
    assert system.usage.prompt_tokens == developer.usage.prompt_tokens == 21 + 12


def test_a_streamed_answer_in_openais_chunks(served):
    stream = client(served).chat.completions.create(
        model="tuned", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == "hello there!" and len([p for p in pieces if p]) > 3  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 13


def test_the_stream_ends_with_done(served):
    request = urllib.request.Request(
        served.url + "/v1/chat/completions",
        json.dumps({"model": "tuned", "messages": HI, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_an_answer_cut_inside_a_character_ends_on_a_whole_one(served):
    """你 is 3 byte tokens: 4 tokens hold 你 and a third of 好, which is never sent (no U+FFFD)."""
    for max_tokens, expected in [(4, "你"), (5, "你"), (6, "你好"), (7, "你好")]:
        stream = client(served).chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "你好"}], max_tokens=max_tokens, stream=True
        )
        chunks = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in chunks]
        assert "".join(pieces) == expected and not any("\ufffd" in p for p in pieces), (max_tokens, pieces)
        assert chunks[-1].choices[0].finish_reason == "length"
        reply = client(served).chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "你好"}], max_tokens=max_tokens
        )
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "length"


def test_stop_strings_and_seeds(served):
    c = client(served)
    reply = c.chat.completions.create(model="tuned", messages=HI, stop=["there"])
    assert reply.choices[0].message.content == "hello" and reply.choices[0].finish_reason == "stop"
    pieces = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model="tuned", messages=HI, stop=["e!", "xyz"], stream=True)
    ]
    assert "".join(pieces) == "hello ther"  # "e" was held back until it was clear it starts "e!"
    sampled = [
        c.chat.completions.create(
            model="base", messages=HI, temperature=1.0, top_p=0.9, seed=seed, max_tokens=12
        )
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


# ---------------------------------------------------------------------------------------------------- tools


def test_a_tool_call_in_the_trained_form_comes_back_as_tool_calls(served):
    c = client(served)
    messages = [{"role": "user", "content": "weather in Paris?"}]
    reply = c.chat.completions.create(model="tuned", messages=messages, tools=WEATHER_TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(
        c.chat.completions.create(model="tuned", messages=messages, tools=WEATHER_TOOLS, stream=True)
    )
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)  # the call's text is not streamed
    (streamed,) = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {
        "city": "Paris"
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call and its result go back in, rendered as in training (a user turn of <tool_response>)
    history = [*messages, choice.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'})
    more = c.chat.completions.create(model="tuned", messages=history, tools=WEATHER_TOOLS, max_tokens=4)
    assert more.usage.prompt_tokens > reply.usage.prompt_tokens


def test_tool_calls_are_parsed_in_each_trained_form():
    text = 'ok\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    content, calls = parse_tool_calls(text, "tokenizer")
    assert content == "ok" and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"x": 1}')
    ]
    assert parse_tool_calls("<tool_call>\n{not json\n</tool_call>", None) == (
        "<tool_call>\n{not json\n</tool_call>",
        [],
    )
    content, calls = parse_tool_calls(
        "get_weather\n```python\ntool_call(city='Paris', days=2)\n```", "chatglm3"
    )
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert parse_tool_calls("just text", "chatglm3") == ("just text", [])


def test_stream_text_holds_back_what_may_be_a_stop_string_or_a_tool_call():
    text = StreamText(["STOP"], ["<tool_call>"])
    assert [text.feed(p) for p in ["  hel", "lo S", "T", "OP and more"]] == ["hel", "lo ", "", ""]
    assert text.stopped and text.text == "  hello " and text.rest() == ""
    text = StreamText([], ["<tool_call>"])
    assert [text.feed(p) for p in ["ok <to", "ol_call>{", "}</tool_call>"]] == ["ok ", "", ""]
    assert text.held_from == 3


# ---------------------------------------------------------------------------------------------------- load and faults


def test_concurrent_clients_are_all_answered(served):
    c = client(served)

    def ask(i: int) -> str:
        if i % 2:
            return "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(model="tuned", messages=HI, stream=True)
            )
        return c.chat.completions.create(model="tuned", messages=HI).choices[0].message.content

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == ["hello there!"] * 8 and time.monotonic() - start < 30
    assert wait_until(lambda: health(served)["admitted"] == 0)


def occupy(served):
    """A long streamed answer of the (slow) base model: the generation thread is busy until it is closed."""
    stream = client(served).chat.completions.create(model="base", messages=HI, max_tokens=200, stream=True)
    iterator = iter(stream)
    next(iterator), next(iterator)  # the role chunk and a first piece of text: it is generating
    assert health(served)["generating"] == 1
    return stream


def test_a_full_queue_answers_503_with_retry_after(served, slow):
    server = served.server
    saved, server.limits.max_queue = server.limits.max_queue, 2
    try:
        busy = occupy(served)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client(served).chat.completions.create, model="tuned", messages=HI)
            assert wait_until(lambda: health(served)["admitted"] == 2)
            status, headers, body = post(served, {"model": "tuned", "messages": HI})
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "server_busy" and "busy" in body["error"]["message"]
            with pytest.raises(openai.InternalServerError) as raised:
                client(served).chat.completions.create(model="tuned", messages=HI)
            assert raised.value.status_code == 503
            busy.close()
            assert waiting.result(timeout=30).choices[0].message.content == "hello there!"
    finally:
        server.limits.max_queue = saved
    assert wait_until(lambda: health(served)["admitted"] == 0)


def test_waiting_requests_are_generated_together_each_as_it_would_be_alone(served, slow):
    c = client(served)
    questions = ["hi", "你好", "hi", "你好", "weather in Paris?"]
    before = health(served)
    busy = occupy(served)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": questions[i]}]
        if i == 2:  # streamed
            return "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(model="tuned", messages=messages, stream=True)
            )
        if i == 4:  # tools
            return (
                c.chat.completions.create(model="tuned", messages=messages, tools=WEATHER_TOOLS)
                .choices[0]
                .message.tool_calls[0]
                .function.name
            )
        return (
            c.chat.completions.create(model="tuned", messages=messages, max_tokens=6 if i == 3 else None)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(5) as pool:
        answers = pool.map(ask, range(5))
        assert wait_until(lambda: health(served)["admitted"] == 6)
        busy.close()
        assert list(answers) == ["hello there!", "你好，世界！", "hello there!", "你好", "get_weather"]
    after = health(served)
    assert after["batches"] == before["batches"] + 2  # the base's answer, then the five together


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(served, slow):
    before = health(served)["cancelled"]
    stream = occupy(served)
    left = time.monotonic()
    stream.close()
    assert wait_until(lambda: health(served)["admitted"] == 0, 2.0)  # 200 tokens would take >= 4 s
    assert time.monotonic() - left < 1.0 and health(served)["cancelled"] == before + 1
    assert client(served).chat.completions.create(model="tuned", messages=HI).choices[0].message.content


def test_a_waiting_client_that_leaves_frees_its_place_at_once(served, slow):
    busy = occupy(served)
    waiting = client(served).chat.completions.create(model="tuned", messages=HI, stream=True)
    next(iter(waiting))  # the role chunk: admitted, waiting behind the busy one
    assert health(served)["admitted"] == 2
    waiting.close()
    assert wait_until(lambda: health(served)["admitted"] == 1, 1.0)
    assert health(served)["generating"] == 1  # the other one still generates
    busy.close()
    assert wait_until(lambda: health(served)["admitted"] == 0)


def test_a_generation_is_capped_in_time(served, slow):
    server = served.server
    saved, server.limits.max_time = server.limits.max_time, 0.3
    try:
        start = time.monotonic()
        reply = client(served).chat.completions.create(model="base", messages=HI, max_tokens=200)
        assert time.monotonic() - start < 2.0
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens < 100
    finally:
        server.limits.max_time = saved


# ---------------------------------------------------------------------------------------------------- bad requests


def msgs(*roles: str) -> list[dict]:
    return [{"role": r, "content": "hi"} for r in roles]


BAD = {  # name: (body, status, param or code in the error)
    "malformed JSON": (b'{"model": "tuned", "messages": [', 400, None),
    "not an object": ([1, 2], 400, None),
    "no model": ({"messages": HI}, 400, "model"),
    "unknown model": ({"model": "gpt-9", "messages": HI}, 404, "model_not_found"),
    "no messages": ({"model": "tuned"}, 400, "messages"),
    "empty messages": ({"model": "tuned", "messages": []}, 400, "messages"),
    "message not an object": ({"model": "tuned", "messages": ["hi"]}, 400, "messages[0]"),
    "unknown role": (
        {"model": "tuned", "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    "content not text": (
        {"model": "tuned", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    "image part": (
        {
            "model": "tuned",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "messages[0].content[0]",
    ),
    "system not first": (
        {"model": "tuned", "messages": msgs("user", "system", "user")},
        400,
        "messages[1].role",
    ),
    "assistant first": ({"model": "tuned", "messages": msgs("assistant", "user")}, 400, "messages"),
    "only system": ({"model": "tuned", "messages": msgs("system")}, 400, "messages"),
    "ends with assistant": ({"model": "tuned", "messages": msgs("user", "assistant")}, 400, "messages"),
    "tool without a call": (
        {"model": "tuned", "messages": msgs("user", "assistant", "tool")},
        400,
        "messages[2]",
    ),
    "longer than the context": (
        {"model": "tuned", "messages": [{"role": "user", "content": "x" * 600}]},
        400,
        "context_length_exceeded",
    ),
    "max_tokens past the context": (
        {"model": "tuned", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 150},
        400,
        "context_length_exceeded",
    ),
    "max_tokens 0": ({"model": "tuned", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens over the cap": ({"model": "tuned", "messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
    "max_tokens not a number": ({"model": "tuned", "messages": HI, "max_tokens": "10"}, 400, "max_tokens"),
    "temperature 3": ({"model": "tuned", "messages": HI, "temperature": 3}, 400, "temperature"),
    "temperature negative": ({"model": "tuned", "messages": HI, "temperature": -0.5}, 400, "temperature"),
    "temperature a word": ({"model": "tuned", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    "top_p 0": ({"model": "tuned", "messages": HI, "top_p": 0}, 400, "top_p"),
    "top_p 1.5": ({"model": "tuned", "messages": HI, "top_p": 1.5}, 400, "top_p"),
    "seed a float": ({"model": "tuned", "messages": HI, "seed": 1.5}, 400, "seed"),
    "n 2": ({"model": "tuned", "messages": HI, "n": 2}, 400, "n"),
    "five stops": ({"model": "tuned", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "stream a word": ({"model": "tuned", "messages": HI, "stream": "yes"}, 400, "stream"),
    "tools not a list": ({"model": "tuned", "messages": HI, "tools": {"name": "f"}}, 400, "tools"),
    "bad tool call": (
        {
            "model": "tuned",
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                },
                {"role": "tool", "content": "1"},
            ],
        },
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
}


def test_every_bad_request_is_a_4xx_in_openais_error_shape_and_the_server_keeps_serving(served):
    for name, (body, status, where) in BAD.items():
        got, _, reply = post(served, body)
        assert got == status, (name, got, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), name
        assert "Traceback" not in error["message"] and error["type"] == "invalid_request_error", name
        if where is not None:
            assert where in (error["param"], error["code"]), (name, error)
    for path, method, status in [("/v1/nope", "GET", 404), ("/v1/chat/completions", "GET", 405)]:
        got, _, reply = http(served, path, method=method)
        assert got == status and set(reply["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="gpt-9", messages=HI)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(served).chat.completions.create(model="tuned", messages=HI, temperature=5)
    assert health(served)["admitted"] == 0
    assert (
        client(served).chat.completions.create(model="tuned", messages=HI).choices[0].message.content
        == "hello there!"
    )


def test_a_body_over_4_mib_is_refused_before_it_is_read(served):
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5242880\r\n\r\n{"
        )
        reply = b""
        while b"}}" not in reply and (data := sock.recv(65536)):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"]["message"] == "the request body is larger than 4194304 bytes"
    assert health(served)["admitted"] == 0


def test_random_bodies_get_api_errors_and_nothing_else(served):
    """2,000 bodies of random JSON pieces in the places a chat request has: each is parsed or refused with an
    ApiError (a 4xx), never another exception (a 500)."""
    rng = random.Random(0)
    atoms = [None, True, False, 0, 1, -1, 2.5, 1e9, "", "x", "user", "assistant", "system", "tool", "developer",
             "tuned", [], {}, "text", "function"]  # fmt: skip
    keys = ["model", "messages", "role", "content", "tools", "tool_calls", "function", "name", "arguments", "type",
            "text", "stop", "max_tokens", "temperature", "top_p", "seed", "n", "stream", "stream_options",
            "include_usage", "tool_call_id", "tool_choice", "max_completion_tokens", "loss"]  # fmt: skip

    def value(depth: int = 0):
        r = rng.random()
        if depth > 3 or r < 0.5:
            return rng.choice(atoms)
        if r < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}

    statuses = set()
    for _ in range(2000):
        body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5 and isinstance(body.get("messages"), list):
                body["messages"].append(
                    value(1)
                    if rng.random() < 0.5
                    else {"role": rng.choice(atoms), rng.choice(keys): value(2)}
                )
            else:
                body[rng.choice(keys)] = value()
        try:
            parse_chat_request(body, served.server.models, Limits(max_new_tokens=100))
        except ApiError as e:
            statuses.add(e.status)
    assert statuses <= {400, 404} and 400 in statuses


def test_an_api_key_is_required_when_set(served):
    with Running(Server(served.server.models, Limits(), api_key="s3cret", say=lambda _: None)) as keyed:
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key="wrong").models.list()
        status, _, body = http(keyed, "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert [m.id for m in client(keyed, api_key="s3cret").models.list()] == ["tuned", "base"]
        assert http(keyed, "/health")[0] == 200
        assert client(keyed, api_key="s3cret").chat.completions.create(model="tuned", messages=HI).choices
    check_host("127.0.0.1", None)
    with pytest.raises(ValueError, match="--api_key"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", "s3cret")


# ---------------------------------------------------------------------------------------------------- the command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inference_py_serve_serves_named_models_and_refuses_an_open_host_without_a_key(byte_models):
    r = subprocess.run(
        [sys.executable, "inference.py", "--serve", "--host", "0.0.0.0", "--model", str(byte_models["base"])],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --host 0.0.0.0 serves beyond"
    )
    port = free_port()
    cmd = [sys.executable, "inference.py", "--serve", "--port", str(port), "--max_new_tokens", "32"]
    cmd += ["--serve_model", f"tuned={byte_models['tuned']}", "--serve_model", f"base={byte_models['base']}"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.loads(r.read())["models"] == ["tuned", "base"]
                    break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert (
            c.chat.completions.create(model="tuned", messages=HI).choices[0].message.content == "hello there!"
        )
        with urllib.request.urlopen(url + "/", timeout=5) as r:
            assert "<title>chatft</title>" in r.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "serving tuned, base at http://127.0.0.1:" in process.stdout.read()


def test_generate_one_says_whether_it_was_cut(served):
    session = served.server.models["tuned"]
    _, ids = render_prompt(session, Conversation([Message("user", "hi")]))
    pieces: list[str] = []
    whole = generate_one(session, ids, GenerationOptions(50), on_text=pieces.append)
    assert whole.stopped and whole.produced == 13 and "".join(pieces) == "hello there!"
    cut = generate_one(session, ids, GenerationOptions(5))
    assert not cut.stopped and cut.produced == 5 and len(cut.ids) == 5
