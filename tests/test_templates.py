"""Conversation -> ids and labels, on a toy tokenizer whose ids can be read off tests/toy.py."""

import pytest
from toy import CHATML, ids, make_tokenizer

from chatft.data.schema import Conversation, Message, ToolCall
from chatft.data.templates import (
    IGNORE_INDEX,
    NATIVE_TEMPLATES,
    TemplateError,
    encode,
    encode_examples,
    get_template,
    truncate,
)

X = IGNORE_INDEX


def chat(*turns: tuple[str, str], **kw) -> Conversation:
    return Conversation([Message(role, content) for role, content in turns], **kw)


def enc(conv, tokenizer=None, template=None, **kw):
    tokenizer = tokenizer or make_tokenizer()
    return encode(conv, tokenizer, None if conv.raw else get_template(template, tokenizer), **kw)


def test_chatml_trains_completion_and_im_end_never_header_nor_newline_after():
    e = enc(chat(("user", "hi"), ("assistant", "hello!")))
    assert e.input_ids == [3, 17, 11, 20, 4, 11, 3, 18, 11, 21, 34, 4, 11]
    assert e.labels == [X, X, X, X, X, X, X, X, X, 21, 34, 4, X]
    assert e.turn_ends == [12]


def test_ids_equal_apply_chat_template_token_for_token():
    tok = make_tokenizer()
    turns = [
        ("system", "ok"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "how are you?"),
        ("assistant", "fine"),
    ]
    e = enc(chat(*turns), tok)
    expected = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=True, return_dict=False
    )
    assert e.input_ids == expected


def test_completion_starting_with_spaces_merges_with_header_newline():
    # "\n  " (header newline + two spaces of the completion) is one token: it holds trained characters, so it
    # is trained, and the tokens are those of the whole rendering, not of the pieces.
    e = enc(chat(("user", "hi"), ("assistant", "  hello")))
    assert e.input_ids == ids(
        "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n  ", "hello",
        "<|im_end|>", "\n",
    )  # fmt: skip
    assert e.labels == [X] * 8 + ids("\n  ", "hello", "<|im_end|>") + [X]


def test_multi_turn_loss_flags_both_ways():
    conv = Conversation(
        [
            Message("user", "hi"),
            Message("assistant", "hello", loss=False),
            Message("user", "bye"),
            Message("assistant", "ok", loss=True),
        ]
    )
    e = enc(conv)
    trained = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X]
    assert trained == ids("ok", "<|im_end|>")
    assert e.labels[e.input_ids.index(ids("hello")[0])] == X


def test_user_and_system_never_trained():
    e = enc(chat(("system", "ok"), ("user", "hello"), ("assistant", "fine")))
    assert [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X] == ids(
        "fine", "<|im_end|>"
    )


def test_template_default_system_prompt_is_rendered_and_untrained():
    template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nok<|im_end|>\n{% endif %}" + CHATML
    )
    tok = make_tokenizer(template)
    e = enc(chat(("user", "hi"), ("assistant", "hello")), tok)
    assert e.input_ids[:5] == ids("<|im_start|>", "system", "\n", "ok", "</s>")[:4] + [4]
    assert [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X] == ids("hello") + [4]


def test_chatglm3_native_trains_metadata_line_and_next_role_token_then_eos():
    tok = make_tokenizer(None)
    e = enc(
        chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok")), tok, "chatglm3"
    )
    # [gMASK] sop <|user|> \n hi <|assistant|> \n hello <|user|> \n bye <|assistant|> \n ok </s>
    assert e.input_ids == [5, 6, 8, 11, 20, 9, 11, 21, 8, 11, 28, 9, 11, 29, 2]
    assert e.labels == [X, X, X, X, X, X, 11, 21, 8, X, X, X, 11, 29, 2]


def test_chatglm3_tool_call_and_observation():
    tok = make_tokenizer(None)
    conv = Conversation(
        [
            Message("user", "weather?"),
            Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris"})]),
            Message("tool", "sunny", name="get_weather"),
            Message("assistant", "sunny"),
        ],
        tools=[{"name": "get_weather"}],
    )
    r = NATIVE_TEMPLATES["chatglm3"].to_dicts(conv, False)
    assert r.messages[0] == {
        "role": "system",
        "content": "Answer the following questions as best as you can. You have access to the following tools:\n"
        '[\n    {\n        "name": "get_weather"\n    }\n]',
    }
    assert r.messages[2] == {
        "role": "assistant",
        "metadata": "get_weather",
        "content": "```python\ntool_call(city='Paris')\n```",
    }
    assert r.messages[3] == {"role": "observation", "content": "sunny"}
    assert r.trained == [False, False, True, False, True]
    e = enc(conv, tok, "chatglm3")
    obs = e.input_ids.index(ids("<|observation|>")[0])
    assert e.labels[obs] == ids("<|observation|>")[0]  # closes the tool call turn
    assert all(label == X for label in e.labels[obs + 1 : obs + 3])  # observation text untrained
    assert e.input_ids[-1] == 2 and e.labels[-1] == 2


def test_tools_fall_back_to_documented_text_when_template_has_none():
    conv = Conversation(
        [
            Message("system", "ok"),
            Message("user", "weather?"),
            Message("assistant", "", tool_calls=[ToolCall("get", {"city": "Paris"})]),
            Message("tool", "sunny"),
            Message("assistant", "sunny"),
        ],
        tools=[{"name": "get"}],
    )
    r = get_template(None, make_tokenizer()).to_dicts(conv, False)
    assert r.messages[0]["content"].startswith("ok\n\nAnswer the following questions")
    assert r.messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert r.messages[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert r.trained == [False, False, True, False, True]


def test_tools_passed_to_template_that_supports_them():
    template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['name'] }}{% endfor %}<|im_end|>\n{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message.tool_calls %}{% for c in message.tool_calls %}{{ c.function.name }}{% endfor %}"
        "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(template)
    conv = Conversation(
        [
            Message("user", "weather?"),
            Message("assistant", "", tool_calls=[ToolCall("get", {})]),
            Message("tool", "sunny", name="get"),
            Message("assistant", "sunny"),
        ],
        tools=[{"name": "city"}],
    )
    e = enc(conv, tok)
    assert e.input_ids[:5] == ids("<|im_start|>", "system", "\n", "city") + [4]
    trained = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X]
    assert trained == ids("get") + [4] + ids("sunny") + [4]
    assert "".join(tok.convert_ids_to_tokens(e.input_ids)).count("<|im_start|>tool\nsunny") == 1


def test_template_that_rewrites_earlier_turns_trains_each_turn_in_its_own_context():
    # Drops the content of every assistant turn but the last (as some reasoning templates do): the first answer
    # is trained in render([user, assistant]), where it is the last message, as the model generated it; the
    # second in the whole conversation. One encode_chat example cannot hold both.
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] != 'assistant' or loop.last %}{{ message['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(template)
    conv = chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok"))
    first, second = encode_examples(conv, tok, get_template(None, tok))
    assert first.input_ids == ids(
        "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "hello",
        "<|im_end|>", "\n",
    )  # fmt: skip
    assert first.labels == [X] * 9 + ids("hello", "<|im_end|>") + [X]
    assert (first.turns, second.turns) == ([1], [2])
    # the history shows the first answer as the template renders it later: empty, untrained
    assert second.input_ids[6:12] == ids(
        "<|im_start|>", "assistant", "\n", "<|im_end|>", "\n", "<|im_start|>"
    )
    assert [t for t, label in zip(second.input_ids, second.labels, strict=True) if label != X] == ids(
        "ok", "<|im_end|>"
    )
    with pytest.raises(TemplateError, match="trains as 2 examples"):
        enc(conv, tok)


def test_no_chat_template_needs_template_flag():
    with pytest.raises(TemplateError, match="no chat template"):
        get_template(None, make_tokenizer(None))
    with pytest.raises(TemplateError, match="unknown --template"):
        get_template("vicuna", make_tokenizer())


def test_input_output_raw_with_prefix_tokens_and_eos():
    tok = make_tokenizer(None, bos=True)
    conv = Conversation([Message("user", "hi there"), Message("assistant", "hello !")], raw=True)
    e = enc(conv, tok)
    assert e.input_ids == [1, 20, 13, 22, 21, 13, 34, 2]
    assert e.labels == [X, X, X, X, 21, 13, 34, 2]
    assert not e.cut
    with pytest.raises(TemplateError, match="no chat template"):
        encode(Conversation(conv.messages), tok, None)
    short = enc(conv, tok, max_source_length=2, max_target_length=2)
    # a response cut by max_target_length gets no EOS: it did not end there
    assert short.input_ids == [1, 20, 21, 13]
    assert short.labels == [X, X, 21, 13]
    assert short.cut and short.closers == []
    fits = enc(conv, tok, max_target_length=4)  # "hello !" + EOS fits exactly
    assert fits.input_ids[-4:] == [21, 13, 34, 2] and not fits.cut and fits.closers == [2]


def test_truncation_drops_later_turns_before_cutting_a_turn():
    conv = chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok"))
    e = enc(conv)
    assert e.turn_ends == [11, 23]
    kept, cut = truncate(e, 20)
    assert cut and kept.input_ids == e.input_ids[:11] and kept.labels == e.labels[:11]
    kept, cut = truncate(e, 9)  # not even the first turn fits: cut inside it
    assert cut and kept.input_ids == e.input_ids[:9] and kept.labels == e.labels[:9] == [X] * 9
    kept, cut = truncate(e, 100)
    assert not cut and kept is e


# --- the end-of-turn rule: exactly one closing token per trained turn ---


def test_chatglm3_content_ending_in_white_space_still_trains_its_closer():
    # the answer's trailing white space is what the model must generate before <|user|> / EOS closes the turn
    tok = make_tokenizer(None)
    e = enc(
        chat(("user", "hi"), ("assistant", "ok\n\n"), ("user", "bye"), ("assistant", "ok ")), tok, "chatglm3"
    )
    # [gMASK] sop <|user|> \n hi <|assistant|> \n ok \n\n <|user|> \n bye <|assistant|> \n ok " " </s>
    assert e.input_ids == [5, 6, 8, 11, 20, 9, 11, 29, 12, 8, 11, 28, 9, 11, 29, 13, 2]
    assert e.labels == [X, X, X, X, X, X, 11, 29, 12, 8, X, X, X, 11, 29, 13, 2]
    assert e.closers == [8, 2]


def test_trailer_written_only_at_the_end_of_a_conversation_is_not_trained():
    # Phi-3's template appends its EOS after the last message when there is no generation prompt
    template = (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}</s>{% endif %}"
    )
    tok = make_tokenizer(template)
    e = enc(chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok")), tok)
    # <|user|> \n hi <|im_end|> \n <|assistant|> \n hello <|im_end|> \n ... <|assistant|> \n ok <|im_end|> \n </s>
    assert e.input_ids[-5:] == [11, 29, 4, 11, 2]
    trained = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X]
    assert trained == ids("hello") + [4] + ids("ok") + [4]
    assert e.closers == [4, 4]


def test_turn_followed_by_ordinary_text_is_refused():
    # no special token closes the answer: "user" text follows it
    template = (
        "{% for message in messages %}{{ message['role'] }}:{{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    conv = chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok"))
    with pytest.raises(TemplateError, match="assistant turn 1 has no closing token"):
        enc(conv, make_tokenizer(template))


def test_answer_holding_the_closer_inside_is_refused():
    conv = chat(("user", "hi"), ("assistant", "hello<|im_end|>there"))
    with pytest.raises(TemplateError, match="holds its end-of-turn token '<|im_end|>'"):
        enc(conv)


def test_last_answer_rendered_differently_once_followed_is_trained_whole():
    # This template drops an answer's content as soon as a message follows it (reasoning templates do the like:
    # Qwen3 gives only the final answer its think block). The last answer has nothing after it: it is exactly
    # what the model generates after the generation prompt, so it is trained whole, not mistaken for a trailer.
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] != 'assistant' or loop.last %}{{ message['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    e = enc(chat(("user", "hi"), ("assistant", "hello there")), make_tokenizer(template))
    assert e.labels == [X] * 9 + ids("hello", " ", "there") + [4, X]


def test_closing_token_ids_per_template():
    from chatft.data.templates import closing_token_ids

    tok = make_tokenizer()
    assert closing_token_ids(tok, get_template(None, tok)) == ids("<|im_end|>")
    glm = make_tokenizer(None)
    assert closing_token_ids(glm, NATIVE_TEMPLATES["chatglm3"]) == ids("</s>", "<|user|>", "<|observation|>")
    assert closing_token_ids(glm, None) == ids("</s>")


def test_label_helpers_against_plain_loops():
    """The fast helpers encode_piece and plan_examples use (list.index, bisect with a key, prefix comparisons)
    give what the plain loops they replace give, on adjacent repeats, zero-width tokens and prefixes of all
    lengths."""
    import random

    from chatft.data.history import _common_prefix
    from chatft.data.labels import _positions, _token_range

    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(6) for _ in range(rng.randrange(12))]
        wanted = {0, 1, None}
        assert _positions(ids, wanted) == [k for k, t in enumerate(ids) if t in wanted]
        a = "".join(rng.choice("ab") for _ in range(rng.randrange(10)))
        b = "".join(rng.choice("ab") for _ in range(rng.randrange(10)))
        naive = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert _common_prefix(a, b) == naive
    offsets = [(0, 2), (2, 2), (2, 5), (5, 6), (6, 9)]  # a zero-width token at 2 counts for character 2
    starts, ends = [s for s, _ in offsets], [max(e, s + 1) for s, e in offsets]
    for lo in range(10):
        for hi in range(lo, 11):
            first = sum(1 for e in ends if e <= lo)
            stop = sum(1 for s in starts if s < hi)
            assert _token_range(offsets, (lo, hi)) == (first, max(first, stop))
