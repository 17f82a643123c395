"""A tiny reasoning model for the inference and serving tests: tests/toy.py's byte-level Llama with a Qwen3-style
template (THINKING), that has learnt LEARNT by heart: each answer after its think block, as the template writes
it (a tool call after the block too). Fixtures: `thinking_model` (its folder), `thinking_served` (a running
server with it as "thinker", and again as "opener", whose prompt opens the think block as DeepSeek-R1's does).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import toy
from conftest import WEATHER_TOOLS
from reasoning_templates import QWEN3

from chatft.data.schema import Conversation, Message, ToolCall

# tests/reasoning_templates.py's Qwen3 layout (an answer after the last user turn gets a think block, empty when it
# has no reasoning; enable_thinking false closes an empty block in the generation prompt) without native tools
# (tools become system text and calls `<tool_call>` blocks, as training writes them), and with open_think, which
# opens the block in the generation prompt as DeepSeek-R1's template does
THINKING = re.sub(
    r"\{%- if tools -%\}.*?\{%- endif -%\}|\s*\{%- if m.tool_calls -%\}.*?\{%- endif -%\}",
    "",
    QWEN3,
    flags=re.S,
)
THINKING = THINKING.replace(
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}",
    "{{- '<think>\\n\\n</think>\\n\\n' -}}\n  {%- elif open_think is defined and open_think -%}{{- '<think>\\n' -}}{%- endif -%}",
)
assert "tool" not in THINKING and "open_think" in THINKING

GREET = "the user greets: greet back"
LOOK_UP = "a weather question: call the tool"
LEARNT = [
    Conversation([Message("user", "hi"), Message("assistant", "hello there!", reasoning=GREET)]),
    Conversation([Message("user", "bye"), Message("assistant", "bye!")]),  # an empty think block
    Conversation(
        [
            Message("user", "weather in Paris?"),
            Message(
                "assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris"})], reasoning=LOOK_UP
            ),
        ],
        tools=WEATHER_TOOLS,
    ),
]


BYTE_TOKENIZER = toy.byte_tokenizer


def thinking_tokenizer():
    tok = BYTE_TOKENIZER()
    tok.chat_template = THINKING
    return tok


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the tiny reasoning model (toy.save_byte_model, trained with THINKING). About 10 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            pytest.MonkeyPatch.context() as patch
        ):  # save_byte_model renders with toy.byte_tokenizer()'s template
            patch.setattr(toy, "byte_tokenizer", thinking_tokenizer)
            return toy.save_byte_model(tmp_path_factory.mktemp("thinking") / "model", LEARNT, steps=80)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def thinking_served(thinking_model: Path):
    """inference.py --serve with the reasoning model as "thinker" and as "opener" (the same weights, the prompt
    rendered with open_think: true), running in this process (a Running: .url, .server)."""
    from chatft.inference.cli import make_parser
    from chatft.inference.serve import Limits, Running, Server, load_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = ["--serve", "--serve_model", f"thinker={thinking_model}"]
    models = load_models(make_parser().parse_args(argv), say=lambda _: None)
    thinker = models["thinker"]
    opened = dataclasses.replace(thinker.template, kwargs={"open_think": True})
    models["opener"] = dataclasses.replace(thinker, template=opened)
    server = Server(models, Limits(max_new_tokens=200, max_time=30, max_queue=8), say=lambda _: None)
    with Running(server) as running:
        yield running
    torch.set_num_threads(threads)
