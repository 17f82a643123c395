"""Files -> tokenized dataset, counts, and the checker's report, exit status and dump (toy tokenizer)."""

import json

import pytest
from toy import make_tokenizer

from chatft.data.check import main as check_main
from chatft.data.dataset import prepare_data, sanity_check_lines

X = -100


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def openai(*turns, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


GOOD = openai(("user", "hi"), ("assistant", "hello"))
TWO_TURNS = openai(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok"))


def test_counts_valid_invalid_skipped_truncated(tmp_path):
    long_first = openai(("user", "hi " * 20), ("assistant", "hello"))  # nothing trained survives the cut
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, TWO_TURNS, {"messages": [{"role": "bot"}]}, long_first])
    p = prepare_data([f], "auto", make_tokenizer(), None, max_seq_length=16, log=lambda _: None)
    s = p.stats
    assert (s.records_read, s.valid, s.invalid, s.skipped, s.truncated) == (4, 3, 1, 1, 1)
    assert p.dataset["record"] == [1, 2]
    assert p.dataset["input_ids"][1] == p.dataset["input_ids"][0][:11]  # second turn dropped whole
    assert s.lengths == [12, 11]
    assert s.trained_tokens == 2 + 2
    assert [str(x) for x in p.problems] == [
        f"{f}:3: messages[0].role: must be one of system, user, assistant, tool; got 'bot'"
    ]
    assert s.notes == [
        f"{f}:2: truncated: 24 -> 11 tokens (1 later trained turn(s) dropped)",
        f"{f}:4: skipped: no trained token left after truncation to max_seq_length 16 (its first trained turn "
        "ends at token 50)",
    ]
    assert s.closing_tokens == {"<|im_end|>": 2}
    lines = s.lines()
    assert "end of turn trained: '<|im_end|>' x2" in lines
    assert lines[lines.index("skipped and truncated examples:") + 1 :][:2] == [f"  {n}" for n in s.notes]


def test_a_record_with_nothing_to_train_is_named(tmp_path):
    untrained = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "loss": False}]
    }
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, untrained])
    s = prepare_data([f], "auto", make_tokenizer(), None, log=lambda _: None).stats
    assert s.skipped == 1 and s.notes == [
        f"{f}:2: skipped: no trained token (no assistant turn is trained: loss false, or no answer)"
    ]


def test_only_the_first_skipped_and_truncated_records_are_named(tmp_path):
    untrained = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "loss": False}]
    }
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [untrained] * 25)
    s = prepare_data([f], "auto", make_tokenizer(), None, log=lambda _: None).stats
    assert s.skipped == 25 and len(s.notes) == 20 and s.notes[-1].startswith(f"{f}:21: skipped")
    assert "skipped and truncated examples (the first 20):" in s.lines()


def test_tools_without_template_support_are_announced(tmp_path):
    tool = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "sunny"},
        ]
    }  # fmt: skip
    lines = []
    prepare_data(
        [write_jsonl(tmp_path / "t.jsonl", [tool])], "auto", make_tokenizer(), None, log=lines.append
    )
    assert any(line.startswith("tools: the chat template has no notion of tools") for line in lines)
    lines.clear()
    prepare_data(
        [write_jsonl(tmp_path / "g.jsonl", [GOOD])], "auto", make_tokenizer(), None, log=lines.append
    )
    assert not any(line.startswith("tools:") for line in lines)


def test_a_slow_tokenizer_is_refused_before_any_work(tmp_path):
    from chatft.data.templates import TemplateError

    class Slow:
        is_fast = False

    with pytest.raises(TemplateError, match="slow one, which gives no character offsets"):
        prepare_data([write_jsonl(tmp_path / "d.jsonl", [GOOD])], "auto", Slow(), None, log=lambda _: None)


@pytest.mark.parametrize("length", [0, -5])
def test_non_positive_max_seq_length_is_refused(tmp_path, length):
    with pytest.raises(
        ValueError, match=f"--max_seq_length must be a positive number of tokens, not {length}"
    ):
        prepare_data([write_jsonl(tmp_path / "d.jsonl", [GOOD])], "auto", make_tokenizer(), None, length)


def test_template_failure_is_a_located_problem(tmp_path):
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}"
    f = write_jsonl(
        tmp_path / "d.jsonl", [GOOD, openai(("system", "ok"), ("user", "hi"), ("assistant", "hello"))]
    )
    p = prepare_data([f], "openai", make_tokenizer(template), None, log=lambda _: None)
    assert [(x.line, x.field) for x in p.problems] == [(2, "(template)")]
    assert "no system" in p.problems[0].message
    assert (p.stats.valid, p.stats.invalid) == (1, 1)


def test_sanity_check_lines_show_token_id_label():
    tok = make_tokenizer()
    lines = sanity_check_lines([3, 21], [X, 21], tok)
    assert lines == [
        "Sanity Check >>>>>>>>>>>>>",
        "      '<|im_start|>':      3 ->   -100",
        "             'hello':     21 ->     21",
        "<<<<<<<<<<<<< Sanity Check",
    ]


def test_sanity_check_groups_a_character_split_over_byte_level_tokens():
    # a byte-level BPE (Qwen's kind, tests/families.py) spells an unseen CJK character as its three UTF-8 bytes
    from families import make_tokenizer as family_tokenizer

    from chatft.data.schema import Conversation, Message
    from chatft.data.templates import encode, get_template

    tok = family_tokenizer("qwen2.5")
    e = encode(
        Conversation([Message("user", "你好"), Message("assistant", "猫。")]), tok, get_template(None, tok)
    )
    lines = sanity_check_lines(e.input_ids, e.labels, tok)
    assert lines[-6:] == [
        "                '\\n':    203 ->   -100",
        "                 '猫': 168, 239, 109 -> 168, 239, 109",
        "                 '。':    511 ->    511",
        "        '<|im_end|>':      2 ->      2",
        "                '\\n':    203 ->   -100",
        "<<<<<<<<<<<<< Sanity Check",
    ]
    half = [X] * (len(e.labels) - 6) + [X, 239, 109, 511, 2, X]  # the label rule never does this
    assert (
        "                 '猫': 168, 239, 109 -> -100, 239, 109   <- partly trained!"
        in sanity_check_lines(e.input_ids, half, tok)
    )


@pytest.fixture
def toy_model_dir(tmp_path):
    d = tmp_path / "tok"
    make_tokenizer().save_pretrained(d)
    return str(d)


def test_check_data_exit_codes_report_and_dump(tmp_path, toy_model_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, TWO_TURNS])
    dump = tmp_path / "out" / "dump.jsonl"
    assert check_main(["--train_file", good, "--model", toy_model_dir, "--dump", str(dump)]) == 0
    out = capsys.readouterr().out
    assert "Sanity Check >>>>>>>>>>>>>" in out and "records read: 2, valid: 2, invalid: 0" in out
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["record"] for r in rows] == [1, 2]
    assert rows[0]["input_ids"] == [3, 17, 11, 20, 4, 11, 3, 18, 11, 21, 4, 11]
    assert rows[0]["labels"] == [X] * 9 + [21, 4, X]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(openai(("user", "hi"))) + "\n")
    assert check_main(["--train_file", str(bad), "--model", toy_model_dir]) == 1
    out = capsys.readouterr().out
    assert "2 invalid record(s):" in out
    assert f"{bad}:2: (json):" in out and f"{bad}:3: messages:" in out

    assert check_main(["--train_file", str(tmp_path / "missing.jsonl"), "--model", toy_model_dir]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert check_main(["--train_file", str(empty), "--model", toy_model_dir]) == 2
    assert f"error: {empty}: no records in this file" in capsys.readouterr().err
    assert check_main(["--train_file", good, "--model", toy_model_dir, "--max_seq_length", "0"]) == 2
    assert check_main(["--train_file", good, "--model", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit) as e:
        check_main(["--train_file", good, "--train_format", "csv"])
    assert e.value.code == 2
