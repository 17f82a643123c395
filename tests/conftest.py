"""Fixtures shared by the test modules: one torch thread; the served tiny models and a server running them
(tests/test_serve*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy import save_byte_model

from chatft.data.schema import Conversation, Message, ToolCall


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a busy 2-core machine they wait on each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}]
BASE = "la " * 80  # what the base byte model answers (more or less) to anything: long enough to be cut
# what the tuned byte model answers, learnt by heart (greedy)
LEARNT = [
    Conversation([Message("user", "hi"), Message("assistant", "hello there!")]),
    Conversation([Message("user", "你好"), Message("assistant", "你好，世界！")]),
    Conversation(
        [
            Message("user", "weather in Paris?"),
            Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris"})]),
        ],
        tools=WEATHER_TOOLS,
    ),
]


@pytest.fixture(scope="session")
def byte_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny Llamas on a byte-level tokenizer (one CJK character = 3 tokens), context 512: "tuned" has LEARNT
    by heart, "base" barely learnt to ramble (BASE) whatever it is asked. About 10 s."""
    root = tmp_path_factory.mktemp("byte-models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tuned = save_byte_model(root / "tuned", LEARNT, steps=80)
        base = save_byte_model(
            root / "base",
            [Conversation([Message("user", "hi"), Message("assistant", BASE)])],
            steps=20,
            seed=1,
        )
    finally:
        torch.set_num_threads(threads)
    return {"tuned": tuned, "base": base}


@pytest.fixture(scope="session")
def served(byte_models: dict[str, Path]):
    """inference.py --serve --serve_model tuned=... --serve_model base=..., running in this process on a free
    127.0.0.1 port (a Running: .url, .server). Tests that change its limits put them back."""
    from chatft.inference.cli import make_parser
    from chatft.inference.serve import Limits, Running, Server, load_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads
    argv = [
        "--serve",
        "--serve_model",
        f"tuned={byte_models['tuned']}",
        "--serve_model",
        f"base={byte_models['base']}",
    ]
    models = load_models(make_parser().parse_args(argv), say=lambda _: None)
    server = Server(models, Limits(max_new_tokens=200, max_time=30, max_queue=8), say=lambda _: None)
    with Running(server) as running:
        yield running
    torch.set_num_threads(threads)
