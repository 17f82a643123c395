"""Preference data: reading, validation and encoding (chatft.preference.formats, .encode), on the toy tokenizer of
tests/toy.py and the model-family tokenizers of tests/families.py. Expected ids are literal."""

import json
from pathlib import Path

import pytest
from families import FAMILIES
from families import make_tokenizer as family_tokenizer
from reasoning_templates import make_tokenizer as reasoning_tokenizer
from reasoning_templates import token_ids
from test_families import TRAINED
from toy import ids, make_tokenizer

from chatft.data.check import main as check_main
from chatft.data.schema import Conversation, Message
from chatft.data.templates import IGNORE_INDEX, encode, encode_examples, get_template
from chatft.preference.encode import encode_example, prepare_preferences
from chatft.preference.formats import load_preferences

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ids("<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")


def write(path: Path, records: list) -> str:
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def prepared(path: str, max_seq_length: int = 2048, unpaired: bool = False, tokenizer=None):
    return prepare_preferences(
        [path],
        "auto",
        tokenizer or make_tokenizer(),
        None,
        max_seq_length,
        unpaired=unpaired,
        log=lambda _m: None,
    )


# Each layout, the same pair: user "hi", chosen "hello there", rejected "bye!"
LAYOUTS = {
    "openai": {"messages": [{"role": "user", "content": "hi"}],
               "chosen": {"role": "assistant", "content": "hello there"},
               "rejected": [{"role": "assistant", "content": "bye!"}]},  # TRL's list form
    "multi-turn": {"conversations": [{"role": "user", "content": "hi"}],
                   "chosen": {"role": "assistant", "content": "hello there"},
                   "rejected": {"role": "assistant", "content": "bye!"}},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}],
                 "chosen": {"from": "gpt", "value": "hello there"}, "rejected": {"from": "gpt", "value": "bye!"}},
    "alpaca": {"instruction": "hi", "input": "", "chosen": "hello there", "rejected": "bye!"},
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_each_chat_layout_gives_the_prompt_and_each_reply_with_its_closing_token(tmp_path, fmt):
    p = prepared(write(tmp_path / "p.jsonl", [LAYOUTS[fmt]]))
    assert p.formats == {str(tmp_path / "p.jsonl"): fmt} and not p.problems
    row = p.dataset[0]
    assert row["prompt_ids"] == PROMPT
    assert row["chosen_ids"] == ids("hello", " ", "there", "<|im_end|>")  # never the "\n" after <|im_end|>
    assert row["rejected_ids"] == ids("bye", "!", "<|im_end|>")


def test_input_output_pairs_are_raw_prompt_then_reply_and_eos(tmp_path):
    p = prepared(write(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "hello there", "rejected": "bye!"}]))
    row = p.dataset[0]
    assert row["prompt_ids"] == ids("hi")
    assert row["chosen_ids"] == ids("hello", " ", "there", "<|im_end|>")  # the toy ChatML tokenizer's EOS
    assert row["rejected_ids"] == ids("bye", "!", "<|im_end|>")


def test_earlier_turns_are_prompt_and_the_prompt_is_a_prefix_of_both_full_renderings(tmp_path):
    record = {"instruction": "how are you?", "chosen": "fine", "rejected": "ok",
              "system": "ok", "history": [["hi", "hello"]]}  # fmt: skip
    row = prepared(write(tmp_path / "p.json", [record])).dataset[0]
    tok = make_tokenizer()
    for reply, ids_ in (("fine", row["chosen_ids"]), ("ok", row["rejected_ids"])):
        conv = Conversation([Message("system", "ok"), Message("user", "hi"), Message("assistant", "hello"),
                             Message("user", "how are you?"), Message("assistant", reply)])  # fmt: skip
        sft = encode(conv, tok, get_template(None, tok))
        # SFT of the whole conversation trains "hello" too; here it is prompt, and the rest is identical
        assert sft.input_ids[: len(row["prompt_ids"]) + len(ids_)] == row["prompt_ids"] + ids_
        assert ids_ == ids(reply, "<|im_end|>")
    assert ids("hello")[0] in row["prompt_ids"]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_trains_what_sft_trains_of_the_same_reply(name):
    """chosen / rejected ids are exactly SFT's trained tokens for that reply (tests/test_families.py TRAINED):
    the completion after the generation prompt through the family's one closing token."""
    tok = family_tokenizer(name)
    template = get_template(None, tok)
    conv = Conversation([Message("user", "hi")])
    enc = encode_example(conv, [Message("assistant", "hello there"), Message("assistant", "ok \n")], None,
                         tok, template, 2048)  # fmt: skip
    assert tok.convert_ids_to_tokens(enc.chosen_ids) == TRAINED[name][0]
    # the reply of SAMPLE_CONVERSATIONS[2] after another prompt: the same tokens
    assert tok.convert_ids_to_tokens(enc.rejected_ids) == TRAINED[name][1]
    sft = encode(Conversation([Message("user", "hi"), Message("assistant", "hello there")]), tok, template)
    trained = [t for t, label in zip(sft.input_ids, sft.labels, strict=True) if label != IGNORE_INDEX]
    assert enc.chosen_ids == trained and sft.input_ids[: len(enc.prompt_ids)] == enc.prompt_ids


def test_a_reply_starting_with_white_space_takes_the_token_it_joins_and_the_pair_shares_the_rest(tmp_path):
    # "  hi" starts with spaces: "\n  " (the header's newline + the spaces) is one token, which SFT trains (it holds
    # trained characters): the prompt both replies share ends before it, and the other reply starts with its "\n"
    record = {"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "  hi"},
              "rejected": {"role": "assistant", "content": "bye"}}  # fmt: skip
    p = prepared(write(tmp_path / "p.jsonl", [record]))
    assert not p.problems and len(p.dataset) == 1
    shared = PROMPT[:-1]  # ... <|im_start|> assistant, without the "\n"
    assert p.dataset[0] == {"prompt_ids": shared, "chosen_ids": ids("\n  ", "hi", "<|im_end|>"),
                            "rejected_ids": ids("\n", "bye", "<|im_end|>"), "file": p.dataset[0]["file"], "record": 1}  # fmt: skip
    alpaca = {
        "instruction": "hi",
        "chosen": "\nhello",
        "rejected": "bye",
    }  # LLaMA-Factory's; "\n\n" is one token
    row = prepared(write(tmp_path / "a.json", [alpaca])).dataset[0]
    assert row["prompt_ids"] == shared and row["chosen_ids"] == ids("\n\n", "hello", "<|im_end|>")
    # the whitespace-led reply is what SFT trains of the same record, token for token
    tok = make_tokenizer()
    sft = encode(
        Conversation([Message("user", "hi"), Message("assistant", "  hi")]), tok, get_template(None, tok)
    )
    trained = [t for t, label in zip(sft.input_ids, sft.labels, strict=True) if label != IGNORE_INDEX]
    assert trained == p.dataset[0]["chosen_ids"] and sft.input_ids[: len(shared)] == shared
    both = {**record, "rejected": {"role": "assistant", "content": "  bye"}}  # both join: nothing moves
    row = prepared(write(tmp_path / "q.jsonl", [both])).dataset[0]
    assert row["prompt_ids"] == shared and row["rejected_ids"] == ids("\n  ", "bye", "<|im_end|>")


# ---------------------------------------------------------------------------------------------------- reasoning


def reasoning_pairs(tmp_path, name: str, records: list, kwargs=None):
    tok = reasoning_tokenizer(name)
    path = write(tmp_path / f"{name}.jsonl", records)
    p = prepare_preferences([path], "auto", tok, None, 2048, log=lambda _m: None, chat_template_kwargs=kwargs)
    return tok, p


MULTI_TURN = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
              {"role": "user", "content": "bye"}]  # fmt: skip
WITH_REASONING = {
    "messages": MULTI_TURN,
    "chosen": {"role": "assistant", "content": "<think>\nso say bye\n</think>\n\nbye !"},  # a leading block
    "rejected": {"role": "assistant", "content": "ok", "reasoning_content": "so say ok"},
}


def test_pairs_with_reasoning_train_it_in_the_replies_generation_context_as_sft_does(tmp_path):
    tok, p = reasoning_pairs(tmp_path, "qwen3", [WITH_REASONING])
    assert not p.problems
    row = p.dataset[0]
    # Qwen3 drops the earlier answer's reasoning: the prompt is the context the model writes the reply in
    assert tok.convert_ids_to_tokens(row["prompt_ids"]) == [
        "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "hello",
        "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "bye", "<|im_end|>", "\n", "<|im_start|>", "assistant",
        "\n",
    ]  # fmt: skip
    assert row["chosen_ids"] == token_ids(tok, "<think>", "\n", "so", " ", "say", " ", "bye", "\n", "</think>",
                                          "\n\n", "bye", " ", "!", "<|im_end|>")  # fmt: skip
    assert row["rejected_ids"] == token_ids(tok, "<think>", "\n", "so", " ", "say", " ", "ok", "\n", "</think>",
                                            "\n\n", "ok", "<|im_end|>")  # fmt: skip
    # SFT of the same conversation ending with the chosen reply trains exactly these tokens in this context
    conv = Conversation([Message("user", "hi"), Message("assistant", "hello", reasoning="greet back"),
                         Message("user", "bye"), Message("assistant", "bye !", reasoning="so say bye")])  # fmt: skip
    last = encode_examples(conv, tok, get_template(None, tok))[-1]
    trained = [t for t, label in zip(last.input_ids, last.labels, strict=True) if label != IGNORE_INDEX]
    assert trained == row["chosen_ids"] and last.input_ids[: len(row["prompt_ids"])] == row["prompt_ids"]


def test_a_pair_differing_only_in_reasoning_is_a_pair_and_reasoning_needs_a_template_with_a_place(tmp_path):
    only_reasoning = {"instruction": "hi", "chosen": "<think>\ngreet back\n</think>\n\nhello",
                      "rejected": "<think>\nso say bye\n</think>\n\nhello"}  # fmt: skip
    tok, p = reasoning_pairs(tmp_path, "qwen3", [only_reasoning])
    assert not p.problems and p.dataset[0]["chosen_ids"][:4] == token_ids(tok, "<think>", "\n", "greet", " ")
    tok, p = reasoning_pairs(
        tmp_path, "chatml", [WITH_REASONING]
    )  # no place for reasoning: refused, not dropped
    assert len(p.dataset) == 0 and "has no place for it" in str(p.problems[0])


def test_templates_that_rewrite_the_history_give_each_pair_the_context_of_its_reply(tmp_path):
    system = [{"role": "system", "content": "ok"}]
    mistral = {"messages": system + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "bye"}], "chosen": {"role": "assistant", "content": "bye !"},
               "rejected": {"role": "assistant", "content": "ok"}}  # fmt: skip
    for name in (
        "mistral",
        "mistral_v03",
    ):  # the system text in the last user turn (v0.3: only in a final one)
        tok, p = reasoning_pairs(tmp_path, name, [mistral])
        row = p.dataset[0]
        assert tok.convert_ids_to_tokens(row["prompt_ids"]) == [
            "<s>", "[INST]", " ", "hi", "[/INST]", " ", "hello", "</s>", "[INST]", " ", "ok", "\n\n", "bye", "[/INST]",
        ], name  # fmt: skip
        assert row["chosen_ids"] == token_ids(tok, " ", "bye", " ", "!", "</s>"), name
    # DeepSeek-R1: the generation prompt opens the think block; a reply with no reasoning joins its "\n"
    deepseek = {**WITH_REASONING, "messages": system + MULTI_TURN}
    tok, p = reasoning_pairs(
        tmp_path, "deepseek_r1", [{**deepseek, "rejected": {"role": "assistant", "content": "ok"}}]
    )
    row = p.dataset[0]
    assert tok.convert_ids_to_tokens(row["prompt_ids"]) == [
        "ok",
        "<|user|>",
        "hi",
        "<|assistant|>",
        "hello",
        "</s>",
        "<|user|>",
        "bye",
        "<|assistant|>",
        "<think>",
    ]  # fmt: skip  (the earlier answer's reasoning dropped)
    assert row["chosen_ids"] == token_ids(tok, "\n", "so", " ", "say", " ", "bye", "\n", "</think>", "\n\n", "bye",
                                          " ", "!", "</s>")  # fmt: skip
    assert row["rejected_ids"] == token_ids(tok, "\n\n", "</think>", "\n\n", "ok", "</s>")
    # Qwen3 with enable_thinking false: the empty block is the prompt's
    plain = {"instruction": "hi", "chosen": "hello", "rejected": "ok"}
    tok, p = reasoning_pairs(tmp_path, "qwen3", [plain], '{"enable_thinking": false}')
    assert tok.convert_ids_to_tokens(p.dataset[0]["prompt_ids"])[-5:] == [
        "\n",
        "<think>",
        "\n\n",
        "</think>",
        "\n\n",
    ]
    assert p.dataset[0]["chosen_ids"] == token_ids(tok, "hello", "<|im_end|>")


def test_check_data_takes_chat_template_kwargs_for_preference_stages(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    reasoning_tokenizer("qwen3").save_pretrained(tok_dir)
    path = write(tmp_path / "p.json", [{"instruction": "hi", "chosen": "hello", "rejected": "ok"}])
    dump = tmp_path / "dump.jsonl"
    argv = ["--stage", "dpo", "--train_file", path, "--model", str(tok_dir), "--dump", str(dump)]
    assert check_main([*argv, "--chat_template_kwargs", '{"enable_thinking": false}']) == 0
    row = json.loads(dump.read_text())
    tokens = reasoning_tokenizer("qwen3").convert_ids_to_tokens(row["prompt_ids"])
    assert tokens[-4:] == ["<think>", "\n\n", "</think>", "\n\n"]  # enable_thinking false: the empty block
    assert check_main([*argv, "--chat_template_kwargs", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_kto_labels_and_a_pair_unpaired_into_true_and_false(tmp_path):
    records = [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "label": True,
        },
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bye"}],
            "kto_tag": False,
        },
    ]
    a = prepared(write(tmp_path / "a.jsonl", records[:1]), unpaired=True)
    b = prepared(write(tmp_path / "b.json", records[1:]), unpaired=True)
    c = prepared(write(tmp_path / "c.jsonl", [LAYOUTS["openai"]]), unpaired=True)
    assert a.dataset.to_list() == [{"prompt_ids": PROMPT, "completion_ids": ids("hello", "<|im_end|>"),
                                    "label": True, "file": str(tmp_path / "a.jsonl"), "record": 1}]  # fmt: skip
    assert b.dataset["completion_ids"] == [ids("bye", "<|im_end|>")] and b.dataset["label"] == [False]
    assert c.dataset["label"] == [True, False] and c.dataset["record"] == [1, 1]
    assert c.dataset["completion_ids"] == [
        ids("hello", " ", "there", "<|im_end|>"),
        ids("bye", "!", "<|im_end|>"),
    ]
    # a DPO stage needs pairs: a labelled record is located
    d = prepared(write(tmp_path / "d.jsonl", records[:1]))
    assert [str(x) for x in d.problems] == [f"{tmp_path / 'd.jsonl'}:1: rejected: missing: this stage needs pairs "
                                            "(a KTO record has one)"]  # fmt: skip


def test_truncation_drops_earliest_exchanges_never_a_reply_and_counts(tmp_path):
    long_history = {"instruction": "how are you?", "chosen": "fine", "rejected": "ok",
                    "history": [["hi", "hello there"], ["bye", "ok"]]}  # fmt: skip
    path = write(tmp_path / "p.json", [long_history, LAYOUTS["alpaca"]])
    whole = prepared(path)
    assert whole.stats.truncated == 0 and len(whole.dataset[0]["prompt_ids"]) == 40
    # 30 tokens: the first exchange goes; 20: both go (the last user turn, the generation prompt, the reply)
    assert prepared(path, max_seq_length=30).dataset[0]["prompt_ids"][:4] == ids(
        "<|im_start|>", "user", "\n", "bye"
    )
    p = prepared(path, max_seq_length=20)
    assert p.stats.truncated == 1 and p.stats.skipped == 0
    assert p.dataset[0]["prompt_ids"] == ids("<|im_start|>", "user", "\n", "how", " ", "are", " ", "you", "?",
                                              "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")  # fmt: skip
    assert p.dataset[0]["chosen_ids"] == ids("fine", "<|im_end|>")
    assert (
        p.stats.notes[0]
        == f"{path}:1: truncated: 42 -> 16 tokens (2 earliest exchange(s) dropped from the prompt)"
    )
    # 12 tokens: the last user turn and the longer reply (14 + 2, 9 + 4) no longer fit: skipped, never cut
    p = prepared(path, max_seq_length=12)
    assert len(p.dataset) == 0 and p.stats.skipped == 2
    assert p.stats.notes[1] == (f"{path}:2: skipped: its prompt's last user turn and the longer reply need 13 tokens, "
                                "above max_seq_length 12 (a reply is never cut)")  # fmt: skip


def test_a_raw_prompt_is_cut_to_fit_and_a_reply_never(tmp_path):
    path = write(
        tmp_path / "p.jsonl", [{"prompt": "hi there how are you", "chosen": "fine", "rejected": "ok !"}]
    )
    p = prepared(path, max_seq_length=7)  # the longer reply is 4 tokens: 3 of the prompt's 9 stay
    assert p.dataset[0]["prompt_ids"] == ids("hi", " ", "there") and p.stats.truncated == 1
    assert p.dataset[0]["rejected_ids"] == ids("ok", " ", "!", "<|im_end|>")
    assert prepared(path, max_seq_length=4).stats.skipped == 1


def test_bad_preference_records_are_located(tmp_path):
    loaded = load_preferences([str(ROOT / "data" / "preference" / "bad_records.jsonl")], log=lambda _m: None)
    name = str(ROOT / "data" / "preference" / "bad_records.jsonl")
    assert [str(p).removeprefix(name + ":") for p in loaded.problems] == [
        "2: rejected: missing (a pair needs a chosen and a rejected reply)",
        "3: rejected: identical to chosen (surrounding white space aside): a pair must prefer one reply to a "
        "different one",
        "4: chosen.content: must be a string, got int",
        "5: chosen: must be a message object, got string",
        "6: chosen.role: must be 'assistant', got 'user'",
        "7: messages: must end with a user (or tool) turn: the chosen and rejected replies answer it",
        "8: chosen.content: must not be empty on a trained assistant turn",
        "9: label: must be a bool (true: a desirable reply), got string",
        "10: chosen: missing: a preference record has chosen and rejected replies, or a KTO label (true/false)",
    ]
    assert len(loaded.records) == 1


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"instruction": "hi", "chosen": "a", "rejected": ["b"]}, "rejected: must be a string, got list"),
        ({"prompt": "hi", "chosen": "a", "rejected": None}, "rejected: must be a string, got null"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "chosen": [],
                "rejected": {"role": "assistant", "content": "b"},
            },
            "chosen: must be one message (or a list of exactly one), got a list of 0",
        ),  # fmt: skip
        (
            {
                "conversations": [{"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "human", "value": "b"},
            },
            "rejected.from: must be 'gpt', got 'human'",
        ),  # fmt: skip
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                "label": 1,
            },
            "label: must be a bool (true: a desirable reply), got int",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                "label": True,
                "kto_tag": True,
            },
            "kto_tag: give the label once (as label or kto_tag), not both",
        ),  # fmt: skip
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "chosen": {"role": "assistant", "content": "a", "loss": False},
                "rejected": {"role": "assistant", "content": "b"},
            },
            "chosen.loss: a preference reply is always trained: remove loss: false",
        ),  # fmt: skip
        (
            {
                "messages": [{"role": "bot", "content": "hi"}],
                "chosen": {"role": "assistant", "content": "a"},
                "rejected": {"role": "assistant", "content": "b"},
            },
            "messages[0].role: must be one of system, user, assistant, tool; got 'bot'",
        ),  # fmt: skip
    ],
)
def test_wrong_types_and_shapes_are_located_at_their_field(tmp_path, record, problem):
    path = write(tmp_path / "p.jsonl", [LAYOUTS["openai"], record] if "messages" in record else [record])
    loaded = load_preferences([path], log=lambda _m: None)
    assert [str(p) for p in loaded.problems] == [f"{path}:{2 if 'messages' in record else 1}: {problem}"]


def test_check_data_stage_shows_both_replies_and_exit_codes(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    good = write(tmp_path / "good.jsonl", [LAYOUTS["openai"]])
    dump = tmp_path / "dump.jsonl"
    assert (
        check_main(["--stage", "dpo", "--train_file", good, "--model", str(tok_dir), "--dump", str(dump)])
        == 0
    )
    out = capsys.readouterr().out
    chosen, rejected = out.split("rejected:\n")
    assert "chosen:\nSanity Check >>>>>>>>>>>>>" in chosen
    assert "'there':     22 ->     22" in chosen and "'bye':     28 ->     28" in rejected
    assert "'assistant':     18 ->   -100" in chosen and "'assistant':     18 ->   -100" in rejected
    assert "pairs (a chosen and a rejected sequence each): 1" in out
    assert "records read: 1, valid: 1, invalid: 0, skipped (a reply does not fit max_seq_length): 0" in out
    assert json.loads(dump.read_text())["rejected_ids"] == ids("bye", "!", "<|im_end|>")
    bad = str(ROOT / "data" / "preference" / "bad_records.jsonl")
    assert check_main(["--stage", "dpo", "--train_file", bad, "--model", str(tok_dir)]) == 1
    assert f"{bad}:3: rejected: identical to chosen" in capsys.readouterr().out
    assert check_main(["--stage", "kto", "--train_file", good, "--model", str(tok_dir)]) == 0
    assert "the reply (label true):\nSanity Check" in capsys.readouterr().out
    args = ["--stage", "dpo", "--train_file", good, "--model", str(tok_dir), "--max_target_length", "8"]
    assert check_main(args) == 2
    assert capsys.readouterr().err.startswith("error: --max_target_length does not apply to preference data")


def test_the_sample_files_are_valid_and_detected(capsys):
    data = ROOT / "data" / "preference"
    tok = make_tokenizer()  # the toy vocabulary does not hold their words; the layouts are what is checked
    for name, fmt in (("openai.jsonl", "openai"), ("sharegpt.json", "sharegpt"), ("alpaca.json", "alpaca"),
                      ("kto.jsonl", "openai")):  # fmt: skip
        loaded = load_preferences([str(data / name)], log=lambda _m: None)
        assert not loaded.problems and loaded.formats == {str(data / name): fmt}
        assert all(ex.paired == (name != "kto.jsonl") for _, _, ex in loaded.records)
    assert len(prepared(str(data / "alpaca.json"), tokenizer=tok).dataset) == 4


def test_pairs_from_predictions_keep_the_predicted_reasoning_apart(tmp_path, capsys):
    from chatft.preference.pairs import main as pairs_main

    data = write(
        tmp_path / "d.jsonl", [{"messages": [*MULTI_TURN, {"role": "assistant", "content": "bye !"}]}]
    )
    row = {"file": data, "record": 1, "reference": "bye !", "reference_reasoning": "",
           "prediction": "<think>\nso say ok\n</think>\n\nok", "reasoning": "so say ok", "answer": "ok"}  # fmt: skip
    predictions = write(tmp_path / "p.jsonl", [row])
    assert pairs_main(["--predictions", predictions, "--output", str(tmp_path / "pairs.jsonl")]) == 0
    (pair,) = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pair["rejected"] == {"role": "assistant", "content": "ok", "reasoning_content": "so say ok"}
    assert pair["messages"][1]["reasoning_content"] == "greet back"
    tok, p = reasoning_pairs(tmp_path, "qwen3", [pair])  # a pair the template trains with its reasoning
    assert p.dataset[0]["rejected_ids"][:4] == token_ids(tok, "<think>", "\n", "so", " ")
