"""A reasoning model's reasoning kept apart from its answer in inference and serving (issue 21): the one split
(chatft.inference.reasoning) on literal texts, then, on the tiny reasoning model of tests/thinking.py, the
terminal chat, batch prediction and its scores, and the server driven by the `openai` client."""

from __future__ import annotations

import io
import json
import random
import sys

import openai
import pytest
import thinking
from conftest import WEATHER_TOOLS
from thinking import GREET, LOOK_UP

from chatft.inference import cli
from chatft.inference.reasoning import ReasoningStream, prompt_opens_think, split_reasoning

HI = [{"role": "user", "content": "hi"}]

# the tiny reasoning model and its server (tests/thinking.py)
thinking_model, thinking_served = thinking.thinking_model, thinking.thinking_served


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_thread):
    """Tiny models: one torch thread (conftest.one_thread)."""


# ---------------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize(
    "text,opened,expected",
    [
        ("<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer")),  # Qwen3
        ("  <think>plan</think>answer ", False, ("plan", "answer")),
        ("<think>\n\n</think>\n\nanswer", False, ("", "answer")),  # Qwen3's empty block: no reasoning
        ("plan\n</think>\n\nanswer", True, ("plan", "answer")),  # DeepSeek-R1: the prompt opened the block
        ("<think>\nplan\n</think>\n\nanswer", True, ("plan", "answer")),  # ... and the model opened it again
        ("\n</think>\n\nanswer", True, ("", "answer")),
        ("<think>\nplan, cut by max_new_tokens", False, ("plan, cut by max_new_tokens", "")),
        ("plan, cut", True, ("plan, cut", "")),
        ("plan\n</think>\n\nanswer", False, ("", "plan\n</think>\n\nanswer")),  # no block was opened: text
        ("just an answer", False, ("", "just an answer")),
        ("a <think> in the middle", False, ("", "a <think> in the middle")),
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),  # the first </think> closes it
    ],
)
def test_split_reasoning_on_literal_texts(text, opened, expected):
    assert split_reasoning(text, opened) == expected


def test_a_prompt_opens_the_think_block_when_its_last_one_is_left_open():
    history = "<|im_start|>assistant\n<think>\nx\n</think>\n\nhi<|im_end|>\n"
    assert prompt_opens_think(history + "<|im_start|>assistant\n<think>\n")  # DeepSeek-R1
    assert not prompt_opens_think(
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )  # enable_thinking off
    assert not prompt_opens_think(history + "<|im_start|>assistant\n")
    assert not prompt_opens_think("hi")


def test_the_stream_hands_out_each_part_once_it_cannot_change():
    stream = ReasoningStream()
    pieces = ["<th", "ink>\nthe ", "plan \n</th", "ink>\n\nhel", "lo ", ""]
    assert [stream.feed(p) for p in pieces] == [
        [],  # may still open a block
        [("reasoning", "the")],  # the white space after it may end the reasoning
        [("reasoning", " plan")],  # "</th" may close it
        [("answer", "hel")],
        [("answer", "lo")],
        [],
    ]
    assert stream.finish() == [] and stream.whole() == ("the plan", "hello")
    cut = ReasoningStream()
    assert cut.feed("<thi") == [] and cut.finish() == [("answer", "<thi")]  # the text ended: it was text


def test_the_stream_puts_together_exactly_what_the_split_gives():
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<th", "ink>", "</", "think>", " ", "\n", "a", "b c", "<", "/", ">"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        opened = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 5))))
        stream, got = ReasoningStream(opened), {"reasoning": "", "answer": ""}
        for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
            for kind, part in stream.feed(text[start:end]):
                got[kind] += part
        for kind, part in stream.finish():
            got[kind] += part
        assert (got["reasoning"], got["answer"]) == split_reasoning(text, opened), (text, opened, cuts)


# ---------------------------------------------------------------------------------------------------- chat, --prompt


def test_chat_shows_the_reasoning_apart_and_the_template_decides_the_history(
    thinking_model, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhi\nclear\nbye\nexit\n"))
    assert cli.main(["--model", str(thinking_model), "--show_prompt", "--max_new_tokens", "120"]) == 0
    out, err = capsys.readouterr()
    assert "Assistant: thinking: the user greets: greet back\nhello there!\n" in out  # not a tty: plain
    assert "Assistant: bye!\n" in out  # an empty think block: no reasoning shown
    # the earlier answer as the template renders history: this Qwen3-style one leaves its reasoning out
    assert err.split("--- prompt ---\n")[2].startswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there!<|im_end|>\n<|im_start|>user\nhi"
        "<|im_end|>\n<|im_start|>assistant\n\n--- end of prompt ---"
    )

    # DeepSeek-R1's way: the prompt opens the block, the model writes only its end
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    kwargs = ["--chat_template_kwargs", '{"open_think": true}']
    assert cli.main(["--model", str(thinking_model), "--max_new_tokens", "120", *kwargs]) == 0
    assert "Assistant: thinking: the user greets: greet back\nhello there!\n" in capsys.readouterr().out

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the reasoning is dimmed
    assert cli.main(["--model", str(thinking_model), "--max_new_tokens", "120"]) == 0
    assert (
        "Assistant: \x1b[2mthinking: the user greets: greet back\x1b[0m\nhello there!\n"
        in capsys.readouterr().out
    )


def test_prompt_mode_splits_a_block_the_prompt_opened(thinking_model, capsys):
    argv = ["--model", str(thinking_model), "--max_new_tokens", "120", "--prompt", "hi", "--show_prompt"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == f"thinking: {GREET}\nhello there!\n"
    # DeepSeek-R1's way: the prompt opens the block, the model writes only its end
    assert cli.main([*argv, "--chat_template_kwargs", '{"open_think": true}']) == 0
    out, err = capsys.readouterr()
    assert "<|im_start|>assistant\n<think>\n\n--- end of prompt ---" in err
    assert out == f"thinking: {GREET}\nhello there!\n"


# ---------------------------------------------------------------------------------------------------- prediction


def test_predictions_keep_reasoning_and_answer_apart_and_score_the_answer(thinking_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    records = [
        {"messages": [*HI, {"role": "assistant", "content": "hello there!", "reasoning_content": GREET}]},
        {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye!"}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "p.jsonl"
    argv = ["--model", str(thinking_model), "--input_file", str(data), "--output_file", str(out)]
    assert cli.main([*argv, "--max_new_tokens", "120", "--eval", "--score_reasoning"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["reasoning"], r["answer"]) for r in rows] == [(GREET, "hello there!"), ("", "bye!")]
    assert [(r["reference_reasoning"], r["reference"]) for r in rows] == [
        (GREET, "hello there!"),
        ("", "bye!"),
    ]
    assert rows[0]["prediction"] == f"<think>\n{GREET}\n</think>\n\nhello there!"  # all the model wrote
    printed = capsys.readouterr().out
    assert "scores over 2 record(s):\n  rouge-1  100.0000" in printed  # the answers, without the reasoning
    assert (
        "reasoning scores over 1 record(s):\n  rouge-1  100.0000" in printed
    )  # asked for: the one with some
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    assert metrics["scores"]["bleu-4"] == 100.0 and metrics["reasoning"]["records"] == 1

    # the prompt opens the block (DeepSeek-R1): the same split
    opened = tmp_path / "o.jsonl"
    argv = ["--model", str(thinking_model), "--input_file", str(data), "--output_file", str(opened)]
    assert cli.main([*argv, "--max_new_tokens", "120", "--chat_template_kwargs", '{"open_think": true}']) == 0
    rows = [json.loads(line) for line in opened.read_text().splitlines()]
    assert rows[0]["prediction"].startswith(GREET) and rows[0]["prompt"].endswith("<think>\n")
    assert [(r["reasoning"], r["answer"]) for r in rows] == [(GREET, "hello there!"), ("", "bye!")]


def test_score_reasoning_needs_records_with_reasoning(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"reference": "a", "prediction": "a", "answer": "a", "reference_reasoning": ""})
    )
    assert cli.main(["--eval", "--predictions", str(path), "--score_reasoning"]) == 2
    assert "--score_reasoning: no row of" in capsys.readouterr().err
    assert cli.main(["--predictions", str(path), "--score_reasoning"]) == 2  # without --eval / --compare


# ---------------------------------------------------------------------------------------------------- serving


def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def streamed(running, **request) -> tuple[str, str, list]:
    """(reasoning, content, chunks) of a streamed answer."""
    chunks = list(client(running).chat.completions.create(stream=True, **request))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    return reasoning, "".join(d.content or "" for d in deltas), chunks


@pytest.mark.parametrize("model", ["thinker", "opener"])  # opener: the prompt opens the block (DeepSeek-R1)
def test_the_server_returns_reasoning_content_apart_plain_and_streamed(thinking_served, model):
    reply = client(thinking_served).chat.completions.create(model=model, messages=HI)
    message = reply.choices[0].message
    assert message.content == "hello there!" and message.reasoning_content == GREET
    assert reply.choices[0].finish_reason == "stop"
    bye = client(thinking_served).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "bye"}]
    )
    assert (
        bye.choices[0].message.content == "bye!"
        and "reasoning_content" not in bye.choices[0].message.model_extra
    )

    reasoning, content, chunks = streamed(thinking_served, model=model, messages=HI)
    assert (reasoning, content) == (GREET, "hello there!")
    kinds = [
        "reasoning" if getattr(c.choices[0].delta, "reasoning_content", None) else "content"
        for c in chunks
        if c.choices
        and (c.choices[0].delta.content or getattr(c.choices[0].delta, "reasoning_content", None))
    ]
    assert kinds.count("reasoning") > 5 and kinds == sorted(
        kinds, reverse=True
    )  # token by token, reasoning first
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_tool_call_written_after_a_think_block_is_parsed(thinking_served):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    request = {"model": "thinker", "messages": messages, "tools": WEATHER_TOOLS, "max_tokens": 180}
    choice = client(thinking_served).chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert choice.message.reasoning_content == LOOK_UP
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    reasoning, content, chunks = streamed(thinking_served, **request)
    assert reasoning == LOOK_UP and content == ""  # the call's text is not streamed as content
    (streamed_call,) = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert streamed_call.function.name == "get_weather"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_a_requests_chat_template_kwargs_reach_its_prompt_and_are_checked(thinking_served):
    c = client(thinking_served)
    plain = c.chat.completions.create(model="thinker", messages=HI, max_tokens=4).usage.prompt_tokens
    off = c.chat.completions.create(
        model="thinker",
        messages=HI,
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.usage.prompt_tokens == plain + len("<think>\n\n</think>\n\n")  # one token per byte
    opened = c.chat.completions.create(
        model="thinker", messages=HI, extra_body={"chat_template_kwargs": {"open_think": True}}
    )
    assert opened.usage.prompt_tokens == plain + len("<think>\n")
    assert (opened.choices[0].message.reasoning_content, opened.choices[0].message.content) == (
        GREET,
        "hello there!",
    )
    for bad, says in [
        ([1], "must be a JSON object"),
        ('{"enable_thinking": false}', "must be an object"),
        ({"add_generation_prompt": False}, "cannot set add_generation_prompt"),
    ]:
        with pytest.raises(openai.BadRequestError, match=says) as raised:
            c.chat.completions.create(model="thinker", messages=HI, extra_body={"chat_template_kwargs": bad})
        assert raised.value.body["param"] == "chat_template_kwargs"


def test_sample_answers_while_training_keep_the_reasoning_apart(thinking_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatft.data.schema import Conversation, Message
    from chatft.data.templates import get_template
    from chatft.training.samples import SampleAnswers

    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    model = AutoModelForCausalLM.from_pretrained(thinking_model)
    samples = [(Conversation([Message("user", "hi")]), "hello there!")]
    rows = SampleAnswers(samples, tokenizer, get_template(None, tokenizer), "sdpa", 120).generate(model)
    assert rows == [
        {"prompt": "hi", "answer": "hello there!", "reasoning": GREET, "reference": "hello there!"}
    ]
