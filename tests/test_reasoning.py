"""Reasoning traces and templates that rewrite the history (issue 21): every trained turn is trained in exactly
the context the template gives it when the model generates it, on the toy layouts of tests/reasoning_templates.py.
"""

from __future__ import annotations

import json
import random

import pytest
from reasoning_templates import REASONING, REWRITING, TEMPLATES, make_tokenizer, token_ids

from chatft.data.check import main as check_main
from chatft.data.dataset import cache_key, prepare_data
from chatft.data.formats import load_conversations, parse_record
from chatft.data.schema import Conversation, Message, RecordError, ToolCall
from chatft.data.templates import (
    IGNORE_INDEX,
    NATIVE_TEMPLATES,
    TemplateError,
    encode_examples,
    get_template,
    parse_chat_template_kwargs,
    render_generation_prompt,
)
from chatft.packing import PackedDataset

X = IGNORE_INDEX


def chat(*turns: tuple[str, str] | Message, tools=None) -> Conversation:
    return Conversation([t if isinstance(t, Message) else Message(*t) for t in turns], tools=tools)


def answer(content: str, reasoning: str | None = None, **kw) -> Message:
    return Message("assistant", content, reasoning=reasoning, **kw)


def examples(name: str, conv: Conversation, kwargs=None):
    tok = make_tokenizer(name)
    return tok, encode_examples(conv, tok, get_template(None, tok, kwargs))


def tokens(tok, e) -> list[str]:
    return tok.convert_ids_to_tokens(e.input_ids)


def trained(tok, e) -> list[str]:
    return tok.convert_ids_to_tokens(
        [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X]
    )


def rendered_ids(tok, messages: list[dict], **kw) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


MIXED = chat(("system", "ok"), ("user", "hi"), answer("hello", "greet back"), ("user", "bye"), answer("ok"))
THINK, END_THINK = "<think>", "</think>"

# ---------------------------------------------------------------------------------------------------- reading


def test_reasoning_is_read_from_reasoning_content_its_alias_and_a_leading_think_block():
    read = parse_record(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "\n<think>\nso bye\n</think>\n\nok", "reasoning": None},
                {"role": "user", "content": "?"},
                {"role": "assistant", "content": "fine", "reasoning": "so"},
            ]
        },
        "openai",
    )
    assert [(m.content, m.reasoning) for m in read.messages if m.role == "assistant"] == [
        ("hello", "greet back"),
        ("ok", "so bye"),
        ("fine", "so"),
    ]
    assert read.messages[0].reasoning is None
    # an empty think block is an empty reasoning (Qwen3 writes one on answers given without thinking)
    assert parse_record({"instruction": "hi", "output": "<think>\n\n</think>\n\nhello"}, "alpaca").messages[
        -1
    ] == Message("assistant", "hello", reasoning="")


def test_every_chat_format_reads_a_think_block():
    think = "<think>\nso\n</think>\n\nhello"
    records = {
        "multi-turn": {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": think}]},
        "alpaca": {"instruction": "bye", "output": think, "history": [["hi", think]]},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": think}]},
    }  # fmt: skip
    for fmt, record in records.items():
        answers = [m for m in parse_record(record, fmt).messages if m.role == "assistant"]
        assert answers and all((m.content, m.reasoning) == ("hello", "so") for m in answers), fmt
    tool = parse_record(
        {
            "conversations": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "tool",
                    "name": "get",
                    "parameters": {},
                    "observation": "sunny",
                    "reasoning_content": "so",
                },
                {"role": "assistant", "content": "sunny", "reasoning_content": "it is"},
            ]
        },
        "multi-turn",
    )
    assert [m.reasoning for m in tool.messages] == [None, "so", None, "it is"]
    # input-output records are raw text: a think block there is text to train
    raw = parse_record({"prompt": "hi", "response": think}, "input-output")
    assert raw.messages[1] == Message("assistant", think)


def test_reasoning_problems_are_located(tmp_path):
    bad = [
        {"messages": [{"role": "user", "content": "hi", "reasoning_content": "x"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>so ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "so</think>ok"}]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "<think>so</think>ok", "reasoning_content": "so"}]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "ok", "reasoning_content": "a", "reasoning": "b"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "reasoning": 3}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>so</think>"}]},
    ]  # fmt: skip
    f = write_jsonl(tmp_path / "d.jsonl", bad)
    assert [str(p) for p in load_conversations([f], log=lambda _: None).problems] == [
        f"{f}:1: messages[0].reasoning_content: only allowed on assistant messages",
        f"{f}:2: messages[1].content: opens a <think> block that is not closed by </think>",
        f"{f}:3: messages[1].content: holds </think> outside a leading <think>...</think> block (reasoning "
        "templates split an answer there): put the reasoning first, or in reasoning_content",
        f"{f}:4: messages[1].content: holds a <think> block and the message has reasoning_content too: give it once",
        f"{f}:5: messages[1].reasoning: give reasoning_content or its alias reasoning, not both",
        f"{f}:6: messages[1].reasoning: must be a string, got int",
        f"{f}:7: messages[1].content: must not be empty on a trained assistant turn",
    ]
    system = {"conversations": [{"role": "system", "content": "s", "reasoning": "x"},
                                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    g = write_jsonl(tmp_path / "g.jsonl", [system])
    assert [str(p) for p in load_conversations([g], log=lambda _: None).problems] == [
        f"{g}:1: conversations[0].reasoning: only allowed on assistant messages"
    ]


# ---------------------------------------------------------------------------------------------------- layouts


def test_qwen3_one_answer_trains_its_think_block_literal_ids():
    tok, [e] = examples("qwen3", chat(("user", "hi"), answer("hello", "greet back")))
    t, end_t = token_ids(tok, THINK, END_THINK)
    # <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n <think> \n greet " " back \n </think> \n\n
    # hello <|im_end|> \n
    assert e.input_ids == [3, 17, 11, 20, 4, 11, 3, 18, 11, t, 11, 69, 13, 70, 11, end_t, 12, 21, 4, 11]
    assert e.labels == [X] * 9 + [t, 11, 69, 13, 70, 11, end_t, 12, 21, 4, X]
    assert e.turns == [1] and e.closers == [4]


def test_qwen3_mixed_multi_turn_is_one_example_per_answer_in_its_own_context():
    tok, (first, second) = examples("qwen3", MIXED)
    head = ["<|im_start|>", "system", "\n", "ok", "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "hi",
            "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]  # fmt: skip
    # the first answer as generated: the last message, its reasoning shown
    assert tokens(tok, first) == [*head, THINK, "\n", "greet", " ", "back", "\n", END_THINK, "\n\n", "hello",
                                  "<|im_end|>", "\n"]  # fmt: skip
    reasoned = [THINK, "\n", "greet", " ", "back", "\n", END_THINK, "\n\n", "hello", "<|im_end|>"]
    assert trained(tok, first) == reasoned
    # the second: the history as the template shows it then (the first answer without its reasoning, untrained),
    # and the final answer's empty think block, which the model generates
    assert tokens(tok, second) == [*head, "hello", "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "bye",
                                   "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", THINK, "\n\n", END_THINK,
                                   "\n\n", "ok", "<|im_end|>", "\n"]  # fmt: skip
    assert trained(tok, second) == [THINK, "\n\n", END_THINK, "\n\n", "ok", "<|im_end|>"]
    assert (first.turns, second.turns) == ([1], [2])
    messages = [{"role": m.role, "content": m.content} for m in MIXED.messages]
    assert second.input_ids == rendered_ids(
        tok, messages
    )  # the whole conversation as the template renders it


def test_qwen3_answers_after_the_last_user_turn_share_one_example_with_tool_calls_beside_text():
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    conv = chat(
        ("user", "weather?"),
        answer("ok", "so", tool_calls=[ToolCall("get", {"city": "Paris"})]),
        Message("tool", "sunny", name="get"),
        answer("sunny", "it is"),
        tools=tools,
    )
    tok, [e] = examples("qwen3", conv)  # both after the last user turn: rendered the same, reasoning kept
    assert trained(tok, e) == [
        THINK, "\n", "so", "\n", END_THINK, "\n\n", "ok", "\n", "<", "tool_call", ">", "get", " ", "{", '"', "city",
        '"', ":", " ", '"', "Paris", '"', "}", "<", "/", "tool_call", ">", "<|im_end|>",
        THINK, "\n", "it", " ", "is", "\n", END_THINK, "\n\n", "sunny", "<|im_end|>",
    ]  # fmt: skip
    assert e.turns == [1, 2]
    # without reasoning the call turn is rendered without a think block once the answer follows: its own example
    bare = answer("ok", tool_calls=[ToolCall("get", {"city": "Paris"})])
    tok, (call, final) = examples(
        "qwen3", chat(conv.messages[0], bare, conv.messages[2], answer("sunny"), tools=tools)
    )
    assert trained(tok, call)[:6] == [THINK, "\n\n", END_THINK, "\n\n", "ok", "\n"]
    assert trained(tok, call)[-2:] == [">", "<|im_end|>"]
    assert "<think>" not in tok.decode(
        final.input_ids[: final.input_ids.index(tok.convert_tokens_to_ids("sunny"))]
    )


def test_qwen3_enable_thinking_false_puts_the_empty_think_block_in_the_prompt():
    conv = chat(("user", "hi"), answer("hello"))
    kwargs = {"enable_thinking": False}
    tok, [e] = examples("qwen3", conv, json.dumps(kwargs))
    assert tokens(tok, e)[9:] == [THINK, "\n\n", END_THINK, "\n\n", "hello", "<|im_end|>", "\n"]
    assert trained(tok, e) == ["hello", "<|im_end|>"]  # the block came with the prompt: not the model's
    _, [thinking] = examples("qwen3", conv)
    assert thinking.input_ids == e.input_ids and thinking.labels != e.labels
    # inference renders with the same options (the helper it calls: get_template with the run's kwargs)
    template = get_template(None, tok, kwargs)
    assert render_generation_prompt(chat(("user", "hi")), tok, template).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(TemplateError, match=r"generation prompt for turn 2 \(chat_template_kwargs"):
        examples("qwen3", chat(("user", "hi"), answer("hello", "so")), kwargs)


def test_deepseek_r1_drops_reasoning_from_the_history_and_its_prompt_opens_the_block():
    tok, (first, second) = examples("deepseek_r1", MIXED)
    assert tokens(tok, first) == ["ok", "<|user|>", "hi", "<|assistant|>", THINK, "\n", "greet", " ", "back", "\n",
                                  END_THINK, "\n\n", "hello", "</s>"]  # fmt: skip
    # the generation prompt wrote <think>\n: the model generates the reasoning on
    assert first.labels == [X] * 6 + first.input_ids[6:]
    assert tokens(tok, second) == ["ok", "<|user|>", "hi", "<|assistant|>", "hello", "</s>", "<|user|>", "bye",
                                   "<|assistant|>", THINK, "\n\n", END_THINK, "\n\n", "ok", "</s>"]  # fmt: skip
    # "\n\n" holds the prompt's newline and the (empty) reasoning's: a token holding a trained character is trained
    assert trained(tok, second) == ["\n\n", END_THINK, "\n\n", "ok", "</s>"]


MISTRAL_TURNS = (
    ("system", "ok"),
    ("user", "hi"),
    ("assistant", "hello"),
    ("user", "bye"),
    ("assistant", "ok"),
)


@pytest.mark.parametrize("name", ["mistral", "mistral_v03"])
def test_mistral_system_text_before_the_last_user_turn(name):
    tok, (first, second) = examples(name, chat(*MISTRAL_TURNS))
    assert tokens(tok, first) == ["<s>", "[INST]", " ", "ok", "\n\n", "hi", "[/INST]", " ", "hello", "</s>"]
    assert trained(tok, first) == [" ", "hello", "</s>"]  # the space after [/INST] is the model's
    assert tokens(tok, second) == ["<s>", "[INST]", " ", "hi", "[/INST]", " ", "hello", "</s>", "[INST]", " ", "ok",
                                   "\n\n", "bye", "[/INST]", " ", "ok", "</s>"]  # fmt: skip
    assert second.labels == [X] * 14 + second.input_ids[14:]
    # v0.3 writes the system text only into a user turn that ends the conversation: no rendering holds it and an
    # answer, so the first answer follows its generation prompt (the same example as the other layout's)
    whole = tok.apply_chat_template([{"role": r, "content": c} for r, c in MISTRAL_TURNS], tokenize=False)
    assert ("ok\n\nhi" in whole, "ok\n\nbye" in whole) == (
        (False, True) if name == "mistral" else (False, False)
    )
    tok, [one] = examples(name, chat(*MISTRAL_TURNS[1:]))  # no system text: nothing moves, one example
    assert trained(tok, one) == [" ", "hello", "</s>", " ", "ok", "</s>"]


def test_stable_chatml_is_one_example_as_before_and_refuses_reasoning_it_has_no_place_for(tmp_path):
    turns = (("system", "ok"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok"))
    tok, [e] = examples("chatml", chat(*turns))
    assert e.input_ids == rendered_ids(tok, [{"role": r, "content": c} for r, c in turns])
    assert e.labels == [X] * 15 + [21, 4, X] + [X] * 9 + [29, 4, X]
    assert e.turns == [1, 2]
    records = [
        {"messages": [{"role": r, "content": c} for r, c in turns]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "<think>\nso\n</think>\n\nhello"}]},
    ]  # fmt: skip
    f = write_jsonl(tmp_path / "d.jsonl", records)
    p = prepare_data([f], "auto", tok, None, log=lambda _: None)
    assert [str(x) for x in p.problems] == [
        f"{f}:2: (template): turn 2 has reasoning, but the tokenizer's chat template has no place for it (it renders "
        "the turn the same with and without its reasoning_content), so training would drop it; use a model whose "
        "chat template renders reasoning_content (a reasoning model's: Qwen3, DeepSeek-R1 style), or leave the "
        "reasoning out of the data"
    ]
    assert p.dataset["input_ids"] == [e.input_ids] and p.stats.split == 0
    # an empty reasoning has nothing to drop; a native template with no place for reasoning is refused alike
    assert examples("chatml", chat(("user", "hi"), answer("hello", "")))[1][0].input_ids[-3:] == [21, 4, 11]
    with pytest.raises(TemplateError, match="--template chatglm3 has no place for it"):
        encode_examples(chat(("user", "hi"), answer("ok", "so")), tok, NATIVE_TEMPLATES["chatglm3"])


def test_a_stable_template_that_keeps_reasoning_trains_it_all_in_one_example():
    tok, [e] = examples("chatml_think", MIXED)
    assert trained(tok, e) == [THINK, "\n", "greet", " ", "back", "\n", END_THINK, "\n\n", "hello", "<|im_end|>",
                               "ok", "<|im_end|>"]  # fmt: skip


def test_untrained_turns_are_context_only():
    early = chat(("user", "hi"), answer("hello", "so", loss=False), ("user", "bye"), answer("ok"))
    tok, [e] = examples("qwen3", early)  # the first answer is only history here: one example
    assert trained(tok, e) == [THINK, "\n\n", END_THINK, "\n\n", "ok", "<|im_end|>"]
    late = chat(("user", "hi"), answer("hello", "so"), ("user", "bye"), answer("ok", loss=False))
    tok, [e] = examples("qwen3", late)  # only the first answer is trained: its own example, nothing after it
    assert tokens(tok, e)[-4:] == ["\n\n", "hello", "<|im_end|>", "\n"] and e.turns == [1]
    tok, [e] = examples("qwen3", chat(("user", "hi"), answer("hello", loss=False)))
    assert e.turns == [] and set(e.labels) == {X}


def test_tool_calls_beside_text_are_kept_where_the_template_has_no_tools():
    conv = chat(
        ("user", "weather?"),
        answer("ok", tool_calls=[ToolCall("get", {"city": "Paris"})]),
        Message("tool", "sunny", name="get"),
        answer("sunny"),
        tools=[{"type": "function", "function": {"name": "get"}}],
    )
    tok, [e] = examples("chatml", conv)
    assert trained(tok, e)[:6] == ["ok", "\n", "<", "tool_call", ">", "\n"]
    glm = make_tokenizer("chatml")
    glm.chat_template = None
    [e] = encode_examples(conv, glm, NATIVE_TEMPLATES["chatglm3"])
    # ChatGLM3: the text an assistant message of its own before the call's, both trained
    assert trained(glm, e)[:5] == ["\n", "ok", "<|assistant|>", "get", "\n"]


# ---------------------------------------------------------------------------------------------------- pipeline


def test_split_records_keep_their_record_number_truncation_and_packing_per_example(tmp_path):
    two = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    one = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}  # fmt: skip
    f = write_jsonl(tmp_path / "d.jsonl", [two, one])
    tok = make_tokenizer("qwen3")
    p = prepare_data([f], "auto", tok, None, log=lambda _: None)
    assert p.dataset["record"] == [1, 1, 2] and p.dataset["file"] == [f] * 3
    whole = len(rendered_ids(tok, two["messages"]))
    s = p.stats
    assert (s.split, s.split_examples, s.split_tokens, s.split_whole_tokens) == (
        1,
        2,
        s.lengths[0] + s.lengths[1],
        whole,
    )
    assert (
        f"split: 1 conversation(s) into 2 examples (the chat template renders earlier turns differently once later "
        f"turns follow: each turn is trained in the context it is generated in), {s.split_tokens} tokens instead of "
        f"{whole} whole (+{s.split_tokens - whole})"
    ) in s.lines()
    # truncation applies to each example: the second one (the whole conversation) does not fit; its turn is lost
    short = prepare_data([f], "auto", tok, None, max_seq_length=s.lengths[0], log=lambda _: None)
    assert short.dataset["record"] == [1, 2] and short.dataset["input_ids"][0] == p.dataset["input_ids"][0]
    assert short.stats.notes == [
        f"{f}:1: example 2 of 2 (turns 2): skipped: no trained token left after truncation to max_seq_length "
        f"{s.lengths[0]} (its first trained turn ends at token {s.lengths[1] - 1})"
    ]
    assert (short.stats.skipped, short.stats.split, short.stats.split_examples) == (1, 1, 2)
    # packing packs the split examples like any others: whole, isolated, the first label of each untrained
    packed = PackedDataset(p.dataset, max_seq_length=64)
    assert len(packed.lengths) == 3 and packed.packed_rows == 1
    row = packed[0]
    assert sorted(row["seq_lens"]) == sorted(s.lengths)
    start = 0
    for n in row["seq_lens"]:
        k = s.lengths.index(n)
        assert row["input_ids"][start : start + n] == p.dataset["input_ids"][k]
        assert row["labels"][start : start + n] == [X] + p.dataset["labels"][k][1:]
        start += n


def test_check_data_dumps_one_line_per_example_and_takes_chat_template_kwargs(tmp_path, capsys):
    tok = make_tokenizer("qwen3")
    tok.save_pretrained(tmp_path / "tok")
    two = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    f = write_jsonl(tmp_path / "d.jsonl", [two, {"messages": two["messages"][:2]}])
    dump = tmp_path / "dump.jsonl"
    argv = ["--train_file", f, "--model", str(tmp_path / "tok"), "--dump", str(dump)]
    assert check_main(argv) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["record"] for r in rows] == [1, 1, 2]
    assert set(rows[0]) == {"file", "record", "input_ids", "labels"}
    assert rows[1]["input_ids"] == rendered_ids(tok, two["messages"])
    out = capsys.readouterr().out
    assert "split: 1 conversation(s) into 2 examples" in out and f"wrote 3 examples to {dump}" in out
    assert check_main([*argv, "--chat_template_kwargs", '{"enable_thinking": false}']) == 0
    quiet = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [tok.convert_ids_to_tokens([t for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != X])
            for r in quiet] == [["hello", "<|im_end|>"], ["ok", "<|im_end|>"], ["hello", "<|im_end|>"]]  # fmt: skip
    assert check_main([*argv, "--chat_template_kwargs", "{"]) == 2
    assert "--chat_template_kwargs must be a JSON object" in capsys.readouterr().err


def test_chat_template_kwargs_are_checked_cached_apart_and_saved_with_the_run(tmp_path):
    from transformers import HfArgumentParser

    from chatft.args import DataArguments

    assert parse_chat_template_kwargs(None) == parse_chat_template_kwargs(" ") == {}
    assert parse_chat_template_kwargs('{"enable_thinking": false}') == {"enable_thinking": False}
    for bad, why in (("[1]", "must be a JSON object, got list"), ('{"add_generation_prompt": true}', "cannot set"),
                     ("nope", "must be a JSON object like")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_chat_template_kwargs(bad)
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    tok = make_tokenizer("qwen3")
    keys = {
        cache_key([f], "auto", tok, None, 64, None, None, chat_template_kwargs=k)
        for k in (None, {"a": 1}, {"a": 2})
    }
    assert len(keys) == 3
    (data,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--chat_template_kwargs", '{"enable_thinking": false}']
    )
    assert data.chat_template_kwargs == {"enable_thinking": False}  # what the run's saved arguments hold
    (data,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses([])
    assert data.chat_template_kwargs is None


# ---------------------------------------------------------------------------------------------------- the rule


WORDS = ["hi", "hello", "there", "how", "are", "you", "fine", "thanks", "bye", "ok", "weather", "Paris", "sunny",
         "question", "answer", "city", "in", "is", "it", "the", "so"]  # fmt: skip


def random_conversation(rng: random.Random, reasoning: bool) -> list[dict]:
    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 5))) + rng.choice(["", ".", "?", "!"])

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text()})
        reply = {"role": "assistant", "content": text()}
        if reasoning and rng.random() < 0.5:
            reply["reasoning_content"] = rng.choice([text(), ""])
        if rng.random() < 0.2:
            reply["loss"] = False
        messages.append(reply)
    return messages


def own_example(name: str, tok, messages: list[dict], i: int) -> tuple[list[int], int, int]:
    """The rule, written out apart from chatft: turn i's context and generation, as (the ids of its own example,
    the first trained token, the token after its closer). The context is render(messages[:i], generation prompt);
    the example is render(messages[:i+1]), which starts with it, save for Mistral v0.3, where the system text
    moves out of the context once the answer follows: there it is the context and the answer after [/INST]."""
    head = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
    upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
    if not upto.startswith(head):
        assert name == "mistral_v03", (name, head, upto)
        upto = head + " " + messages[i]["content"].strip() + tok.eos_token
    enc = tok(upto, add_special_tokens=False, return_offsets_mapping=True)
    first = next(k for k, (_, end) in enumerate(enc["offset_mapping"]) if end > len(head))
    closer = max(k for k, t in enumerate(enc["input_ids"]) if t == tok.eos_token_id)
    assert not upto[enc["offset_mapping"][closer][1] :].strip()  # nothing of the turn after its closer
    return enc["input_ids"], first, closer + 1


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_trained_turn_is_trained_once_in_the_context_it_is_generated_in(name):
    rng = random.Random(21)
    tok = make_tokenizer(name)
    template = get_template(None, tok)
    split = 0
    for _ in range(150):
        messages = random_conversation(rng, reasoning=name in REASONING)
        conv = Conversation(
            [
                Message(m["role"], m["content"], m.get("loss"), reasoning=m.get("reasoning_content"))
                for m in messages
            ]
        )
        answers = [
            i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("loss") is not False
        ]
        found = encode_examples(conv, tok, template)
        assert sorted(n for e in found for n in e.turns) == list(range(1, len(answers) + 1))  # each once
        split += len(found) > 1
        for e in found:
            expected_labels = [X] * len(e.input_ids)
            for n, stop in zip(e.turns, e.turn_ends, strict=True):
                own, first, own_stop = own_example(name, tok, messages, answers[n - 1])
                assert stop == own_stop and e.input_ids[:stop] == own[:stop], (messages, n)
                expected_labels[first:stop] = own[first:stop]
            assert e.labels == expected_labels, messages  # each turn's generation, nothing else
    # the rewriting layouts split multi-turn conversations, the stable ones never do
    assert (split > 0) == (name in REWRITING), split


def test_conversion_writes_reasoning_where_the_format_has_a_place_for_it():
    from chatft.data.convert import to_record

    conv = chat(
        ("system", "ok"), ("user", "hi"), answer("hello", "greet back"), ("user", "bye"), answer("ok", "")
    )
    for fmt in ("openai", "multi-turn", "alpaca", "sharegpt"):
        assert parse_record(to_record(conv, fmt), fmt) == conv, fmt
    assert (
        to_record(conv, "sharegpt")["conversations"][1]["value"] == "<think>\ngreet back\n</think>\n\nhello"
    )
    with pytest.raises(RecordError, match="input-output responses are raw text"):
        to_record(chat(("user", "hi"), answer("hello", "so")), "input-output")
