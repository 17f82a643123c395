"""Tests for chatft.data.convert and the data construction scripts: writers, round trips, convert_data,
split_data, format_advertise_gen and format_tool_alpaca."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatft.data.convert import (
    as_written,
    dedup,
    parse_renames,
    prompt_key,
    rename_keys,
    rendering_notes,
    split,
    to_record,
)
from chatft.data.formats import FORMAT_NAMES, load_conversations, parse_record
from chatft.data.formatters import react_thought, tool_alpaca_entry
from chatft.data.schema import Conversation, Message, RecordError, ToolCall

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data"
SHARED = REPO.parent / "shared" / "data"
SAMPLE_FILES = {
    "multi-turn": SAMPLES / "multi_turn.jsonl",
    "input-output": SAMPLES / "input_output.jsonl",
    "openai": SAMPLES / "openai_messages.jsonl",
    "alpaca": SAMPLES / "alpaca.json",
    "sharegpt": SAMPLES / "sharegpt.json",
}


def run_script(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def write_jsonl(path: Path, *records: Any) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cannot(conv: Conversation, fmt: str) -> str:
    with pytest.raises(RecordError) as caught:
        to_record(conv, fmt)
    return f"{caught.value.field}: {caught.value.message}"


def sample_conversations() -> list[tuple[str, Conversation]]:
    loaded = load_conversations([str(p) for p in SAMPLE_FILES.values()], log=lambda _line: None)
    assert not loaded.problems
    formats = {str(path): fmt for fmt, path in SAMPLE_FILES.items()}
    return [(formats[name], conv) for name, _, conv in loaded.records]


def user(text: str, **extra: Any) -> Message:
    return Message("user", text, **extra)


def bot(text: str, **extra: Any) -> Message:
    return Message("assistant", text, **extra)


def call(name: str, **arguments: Any) -> Message:
    return Message("assistant", "", tool_calls=[ToolCall(name, arguments)])


def result(text: str, name: str | None) -> Message:
    return Message("tool", text, name=name)


WEATHER_TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}]
TOOL_CONV = Conversation(
    [
        Message("system", "你会调用工具。"),
        user("北京天气怎么样？"),
        bot("我查一下。", loss=False),
        call("get_weather", city="北京"),
        result('{"temp": 23}', "get_weather"),
        bot("北京晴，23 度。"),
    ],
    tools=WEATHER_TOOLS,
)


# ---------------------------------------------------------------------------------------------------- writers


def test_multi_turn_writer() -> None:
    assert to_record(TOOL_CONV, "multi-turn") == {
        "tools": WEATHER_TOOLS,
        "conversations": [
            {"role": "system", "content": "你会调用工具。"},
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "content": "我查一下。", "loss": False},
            {
                "role": "tool",
                "name": "get_weather",
                "parameters": {"city": "北京"},
                "observation": '{"temp": 23}',
            },
            {"role": "assistant", "content": "北京晴，23 度。"},
        ],
    }


def test_multi_turn_writer_keeps_loss_on_tool_turn_and_user() -> None:
    conv = Conversation(
        [
            user("q", loss=False),
            Message("assistant", "", loss=False, tool_calls=[ToolCall("f", {})]),
            result("r", "f"),
            bot("a"),
        ]
    )
    assert to_record(conv, "multi-turn") == {
        "conversations": [
            {"role": "user", "content": "q", "loss": False},
            {"role": "tool", "name": "f", "parameters": {}, "observation": "r", "loss": False},
            {"role": "assistant", "content": "a"},
        ]
    }


def test_input_output_writer() -> None:
    conv = Conversation([user("类型#裙*颜色#红色"), bot("这款红色连衣裙……")], raw=True)
    assert to_record(conv, "input-output") == {"prompt": "类型#裙*颜色#红色", "response": "这款红色连衣裙……"}


def test_openai_writer() -> None:
    assert to_record(TOOL_CONV, "openai") == {
        "tools": WEATHER_TOOLS,
        "messages": [
            {"role": "system", "content": "你会调用工具。"},
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "content": "我查一下。", "loss": False},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 23}'},
            {"role": "assistant", "content": "北京晴，23 度。"},
        ],
    }


def test_openai_writer_links_parallel_calls_by_name_and_keeps_unnamed_results_unlinked() -> None:
    parallel = Message("assistant", "checking", tool_calls=[ToolCall("a", {"x": 1}), ToolCall("b", {})])
    conv = Conversation(
        [user("q"), parallel, result("rb", "b"), result("ra", "a"), result("r?", None), bot("done")]
    )
    messages = to_record(conv, "openai")["messages"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_2"]
    assert messages[1]["content"] == "checking"
    assert messages[2:5] == [
        {"role": "tool", "tool_call_id": "call_2", "name": "b", "content": "rb"},
        {"role": "tool", "tool_call_id": "call_1", "name": "a", "content": "ra"},
        {"role": "tool", "content": "r?"},
    ]


def test_alpaca_writer() -> None:
    conv = Conversation(
        [
            Message("system", "你是老师。"),
            user("1+1?"),
            bot("2"),
            user("2+2?", loss=False),
            bot("4", loss=True),
        ]
    )
    assert to_record(conv, "alpaca") == {
        "instruction": "2+2?",
        "output": "4",
        "system": "你是老师。",
        "history": [["1+1?", "2"]],
    }
    assert to_record(Conversation([user("hi"), bot("hello")]), "alpaca") == {
        "instruction": "hi",
        "output": "hello",
    }


def test_sharegpt_writer() -> None:
    conv = Conversation(
        [
            Message("system", "sys"),
            user("price?"),
            call("get_price", symbol="AAPL"),
            result("189.84", None),
            bot("$189.84"),
        ],
        tools=[{"name": "get_price"}],
    )
    assert to_record(conv, "sharegpt") == {
        "conversations": [
            {"from": "human", "value": "price?"},
            {"from": "function_call", "value": '{"name": "get_price", "arguments": {"symbol": "AAPL"}}'},
            {"from": "observation", "value": "189.84"},
            {"from": "gpt", "value": "$189.84"},
        ],
        "system": "sys",
        "tools": '[{"name": "get_price"}]',
    }


def test_sharegpt_writer_blank_system_and_parallel_calls() -> None:
    parallel = Message("assistant", "", tool_calls=[ToolCall("a", {}), ToolCall("b", {"k": "v"})])
    conv = Conversation([Message("system", ""), user("q"), parallel, result("r", None), bot("a")])
    assert to_record(conv, "sharegpt")["conversations"][:3] == [
        {"from": "system", "value": ""},
        {"from": "human", "value": "q"},
        {
            "from": "function_call",
            "value": '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": "v"}}]',
        },
    ]


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_every_sample_round_trips_in_its_own_format(fmt: str) -> None:
    convs = [conv for source, conv in sample_conversations() if source == fmt]
    assert convs
    for conv in convs:
        assert parse_record(to_record(conv, fmt), fmt) == conv


def test_samples_converted_to_every_format_read_back_as_written() -> None:
    accepted = dict.fromkeys(FORMAT_NAMES, 0)
    for _, conv in sample_conversations():
        for fmt in FORMAT_NAMES:
            try:
                record = to_record(conv, fmt)
            except RecordError as e:
                assert e.field == f"(to {fmt})"
                continue
            accepted[fmt] += 1
            assert parse_record(record, fmt) == as_written(conv, fmt)
    assert min(accepted.values()) >= 5, accepted


def random_conversation(rng: random.Random) -> Conversation:
    texts = ["q", "答", "", " ", "a\nb"]
    if rng.random() < 0.1:  # the one shape every format can express
        return Conversation([user(rng.choice(texts)), bot(rng.choice(texts))], raw=rng.random() < 0.5)
    messages = []
    if rng.random() < 0.3:
        messages.append(Message("system", rng.choice(texts), loss=rng.choice([None, None, False])))
    for _ in range(rng.randint(1, 3)):
        messages.append(user(rng.choice(texts), loss=rng.choice([None, None, False])))
        if rng.random() < 0.3:
            calls = [
                ToolCall(rng.choice("fg"), {"x": rng.randint(0, 2)}) for _ in range(rng.choice([1, 1, 2]))
            ]
            messages.append(
                Message(
                    "assistant", rng.choice(["", "", "t"]), loss=rng.choice([None, False]), tool_calls=calls
                )
            )
            for c in calls:
                name = rng.choice([c.name, c.name, None, "h"])
                messages.append(
                    Message("tool", rng.choice(texts), loss=rng.choice([None, None, False]), name=name)
                )
        messages.append(bot(rng.choice(texts), loss=rng.choice([None, None, True, False])))
    tools = rng.choice([None, None, [], [{"name": "f"}], ["doc"], {"not": "a list"}])
    return Conversation(messages, tools=tools, raw=rng.random() < 0.2)


def test_random_conversations_either_cannot_be_written_or_read_back_as_written() -> None:
    rng = random.Random(1234)
    accepted = dict.fromkeys(FORMAT_NAMES, 0)
    exact = dict.fromkeys(FORMAT_NAMES, 0)
    for _ in range(3000):
        conv = random_conversation(rng)
        for fmt in FORMAT_NAMES:
            try:
                record = to_record(conv, fmt)
            except RecordError as e:
                assert e.field == f"(to {fmt})" and e.message
                continue
            accepted[fmt] += 1
            back = parse_record(json.loads(json.dumps(record, ensure_ascii=False)), fmt)
            assert back == as_written(conv, fmt)
            if as_written(conv, fmt) == conv:  # nothing format-dependent: the exact round trip
                exact[fmt] += 1
                assert back == conv
    assert min(accepted.values()) >= 30, accepted
    assert min(exact.values()) >= 10, exact


def test_as_written_drops_only_default_loss_flags_where_the_format_has_none() -> None:
    conv = Conversation([user("q", loss=False), bot("a", loss=True)])
    assert as_written(conv, "alpaca") == Conversation([user("q"), bot("a")])
    assert as_written(conv, "openai") == conv
    assert as_written(conv, "input-output") == Conversation([user("q"), bot("a")], raw=True)
    with_result = Conversation([user("q"), call("f"), Message("tool", "r", loss=False, name="f"), bot("a")])
    assert as_written(with_result, "multi-turn").messages[2] == result("r", "f")
    assert as_written(with_result, "openai") == with_result


# ---------------------------------------------------------------------------------------------------- unexpressible


TWO_TURNS = Conversation([user("q1"), bot("a1"), user("q2"), bot("a2")])
UNTRAINED = Conversation([user("q"), bot("draft", loss=False), user("again"), bot("final")])
UNNAMED_RESULT = Conversation([user("q"), call("f"), result("r", None), bot("a")])


@pytest.mark.parametrize(
    ("conv", "fmt", "expected"),
    [
        (
            Conversation([user("q"), bot("a")], tools=WEATHER_TOOLS),
            "alpaca",
            "(to alpaca): alpaca has no tools",
        ),
        (
            Conversation([user("q"), bot("a")], tools=[]),
            "input-output",
            "(to input-output): input-output has no tools",
        ),
        (
            Conversation([user("q"), call("f"), result("r", "f"), bot("a")]),
            "alpaca",
            "(to alpaca): message 2 (assistant) has tool calls; alpaca has no tool calls",
        ),
        (
            TWO_TURNS,
            "input-output",
            "(to input-output): input-output holds one prompt and one response; got 4 messages "
            "(user, assistant, user, assistant)",
        ),
        (
            Conversation([Message("system", "s"), user("q"), bot("a")]),
            "input-output",
            "(to input-output): input-output holds one prompt and one response; got 3 messages (system, user, assistant)",
        ),
        (
            UNTRAINED,
            "alpaca",
            "(to alpaca): message 2 (assistant) has loss: false; alpaca cannot mark a turn untrained",
        ),
        (
            UNTRAINED,
            "sharegpt",
            "(to sharegpt): message 2 (assistant) has loss: false; sharegpt cannot mark a turn untrained",
        ),
        (
            Conversation([user("q"), bot("a", loss=False)]),
            "input-output",
            "(to input-output): message 2 (assistant) has loss: false; input-output cannot mark a turn untrained",
        ),
        (
            UNNAMED_RESULT,
            "multi-turn",
            "(to multi-turn): message 3 (tool) answers the call to 'f' in message 2 but has no name; "
            "a multi-turn tool turn has one name for both",
        ),
        (
            Conversation(
                [user("q"), Message("assistant", "", tool_calls=[ToolCall("f", {}), ToolCall("g", {})])]
            ),
            "multi-turn",
            "(to multi-turn): message 2 (assistant) has 2 tool calls; a tool turn holds one",
        ),
        (
            Conversation(
                [
                    user("q"),
                    Message("assistant", "let me see", tool_calls=[ToolCall("f", {})]),
                    result("r", "f"),
                    bot("a"),
                ]
            ),
            "multi-turn",
            "(to multi-turn): message 2 (assistant) has text and a tool call; a multi-turn tool turn has no text",
        ),
        (
            Conversation([user("q"), call("f"), bot("a")]),
            "multi-turn",
            "(to multi-turn): message 2 (assistant) is a tool call without its result; a tool turn holds both",
        ),
        (
            Conversation([user("q"), call("f"), result("r", "f"), result("r2", "f"), bot("a")]),
            "multi-turn",
            "(to multi-turn): message 4 (tool) does not follow a tool call; "
            "multi-turn writes a call and its result as one tool turn",
        ),
        (
            Conversation([user("q"), call("f"), result("r", "f"), bot("a")]),
            "sharegpt",
            "(to sharegpt): message 3 (tool) is named 'f'; sharegpt observations have no name",
        ),
        (
            Conversation([Message("system", " "), user("q"), bot("a")]),
            "alpaca",
            "(to alpaca): message 1 (system) is empty; alpaca has no place for an empty system message",
        ),
        (
            Conversation([user("q"), user("q2"), bot("a")]),
            "alpaca",
            "(to alpaca): alpaca holds [question, answer] pairs: message 1 must be a user message followed by an "
            "assistant reply (roles: user, user, assistant)",
        ),
        (
            Conversation([user("q"), user("q2"), bot("a")]),
            "sharegpt",
            "(to sharegpt): the written record would be invalid: conversations[1].from: expected gpt or "
            "function_call here (turns alternate), got 'human'",
        ),
        (
            Conversation([user(""), bot("a")]),
            "alpaca",
            "(to alpaca): the written record would be invalid: instruction: must not be empty",
        ),
        (
            Conversation([user("q"), bot("a")], tools={"not": "a list"}),
            "openai",
            "(to openai): the written record would be invalid: tools: must be a list, got object",
        ),
    ],
)
def test_unexpressible_conversations_raise(conv: Conversation, fmt: str, expected: str) -> None:
    assert cannot(conv, fmt) == expected


def test_unknown_output_format() -> None:
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        to_record(TWO_TURNS, "csv")


# ---------------------------------------------------------------------------------------------------- --map


def test_parse_renames_and_rename_keys() -> None:
    renames = parse_renames(["instruction=question", "output=answer"])
    assert renames == {"instruction": "question", "output": "answer"}
    assert rename_keys({"id": 1, "question": "q", "answer": "a"}, renames) == {
        "id": 1,
        "instruction": "q",
        "output": "a",
    }
    assert rename_keys({"a": 1, "b": 2}, parse_renames(["a=b", "b=a"])) == {"b": 1, "a": 2}
    with pytest.raises(RecordError, match="present together with 'question'"):
        rename_keys({"question": "q", "instruction": "i"}, renames)
    for bad in (["instruction"], ["=question"], ["a=b", "a=c"], ["a=b", "c=b"]):
        with pytest.raises(ValueError):
            parse_renames(bad)


def test_rendering_notes() -> None:
    assert rendering_notes({"a.jsonl": "input-output", "b.json": "alpaca"}, "openai") == [
        "note: a.jsonl (input-output) is rendered raw (no chat markup); as openai it will be rendered with the "
        "chat template"
    ]
    assert rendering_notes({"b.json": "alpaca"}, "input-output") == [
        "note: b.json (alpaca) is rendered with the chat template; as input-output it will be rendered raw "
        "(no chat markup)"
    ]
    assert rendering_notes({"a.jsonl": "input-output"}, "input-output") == []


# ---------------------------------------------------------------------------------------------------- convert_data


ALPACA_RECORDS = [
    {"instruction": "只剩一个心脏了还能活吗？", "output": "能，人本来就只有一个心脏。"},
    {
        "instruction": "把句子改成被动语态。",
        "input": "小明打碎了花瓶。",
        "output": "花瓶被小明打碎了。",
        "system": "你是语文老师。",
    },
]


def test_convert_alpaca_to_openai_keeps_non_ascii(tmp_path: Path) -> None:
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    out = tmp_path / "out" / "openai.jsonl"
    r = run_script("convert_data", "--input", str(source), "--output_format", "openai", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{source}: format alpaca (detected)" in r.stdout
    assert "read 2, written 2, invalid 0 (0 failed validation, 0 cannot be expressed as openai)" in r.stdout
    raw = out.read_bytes()
    assert "只剩一个心脏了还能活吗？".encode() in raw and b"\\u" not in raw
    assert read_jsonl(out) == [
        {
            "messages": [
                {"role": "user", "content": "只剩一个心脏了还能活吗？"},
                {"role": "assistant", "content": "能，人本来就只有一个心脏。"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "你是语文老师。"},
                {"role": "user", "content": "把句子改成被动语态。\n小明打碎了花瓶。"},
                {"role": "assistant", "content": "花瓶被小明打碎了。"},
            ]
        },
    ]


def test_convert_with_map_renames_raw_keys_and_writes_a_json_array(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "ruozhiba.jsonl",
        {"question": "为什么长颈鹿的脖子长？", "answer": "为了吃到高处的树叶。"},
        {"question": "冰箱里的冰会冷吗？", "answer": "会。", "instruction": "clash"},
    )
    out = tmp_path / "alpaca.json"
    args = ["--input", str(source), "--output_format", "alpaca", "--output", str(out)]
    r = run_script("convert_data", *args, "--map", "instruction=question", "--map", "output=answer")
    assert r.returncode == 1
    assert (
        f"{source}:2: instruction: present together with 'question'; --map instruction=question would overwrite it"
    ) in r.stdout
    assert "read 2, written 1, invalid 1 (1 failed validation, 0 cannot be expressed as alpaca)" in r.stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith("[") and "长颈鹿" in text
    assert json.loads(text) == [{"instruction": "为什么长颈鹿的脖子长？", "output": "为了吃到高处的树叶。"}]


def test_convert_reports_invalid_and_unexpressible_records_and_writes_the_rest(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "chat.jsonl",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "meh", "loss": False},
            ]
        },
    )
    with source.open("a", encoding="utf-8") as f:
        f.write('{"messages": [\n')
    out = tmp_path / "alpaca.jsonl"
    r = run_script("convert_data", "--input", str(source), "--output_format", "alpaca", "--output", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[1:] == [
        "3 invalid record(s):",
        f"{source}:2: messages[1].role: must be one of system, user, assistant, tool; got 'bot'",
        f"{source}:3: (to alpaca): message 2 (assistant) has loss: false; alpaca cannot mark a turn untrained",
        f"{source}:4: (json): invalid JSON: Expecting value (column 15)",
        "read 4, written 1, invalid 3 (2 failed validation, 1 cannot be expressed as alpaca)",
        f"wrote {out}",
    ]
    assert read_jsonl(out) == [{"instruction": "hi", "output": "hello"}]
    assert r.stderr == ""


def test_convert_input_output_to_openai_notes_the_rendering_change(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "adgen.jsonl", {"content": "类型#裙", "summary": "一条裙子。"})
    out = tmp_path / "o.jsonl"
    r = run_script("convert_data", "--input", str(source), "--output_format", "openai", "--output", str(out))
    assert r.returncode == 0
    assert "(input-output) is rendered raw (no chat markup); as openai it will be rendered with" in r.stdout
    assert read_jsonl(out) == [
        {"messages": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子。"}]}
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--input", "missing.jsonl", "--output_format", "openai", "--output", "x.jsonl"],
            "no such file or directory",
        ),
        (
            ["--input", "data/alpaca.json", "--output_format", "openai", "--output", "x.jsonl", "--map", "a"],
            "NEW=OLD",
        ),
        (["--input", "data/alpaca.json", "--output_format", "csv", "--output", "x.jsonl"], "invalid choice"),
        (["--input", "data/alpaca.json", "--output", "x.jsonl"], "required: --output_format"),
    ],
)
def test_convert_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(REPO / a) if a.startswith("data/") else a for a in args]
    r = run_script("convert_data", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_convert_undetectable_file_counts_every_record(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "raw.jsonl", {"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}
    )
    out = tmp_path / "o.jsonl"
    r = run_script("convert_data", "--input", str(source), "--output_format", "openai", "--output", str(out))
    assert r.returncode == 1
    assert f"{source}:1: (format): cannot detect the format" in r.stdout
    assert "read 2, written 0, invalid 2" in r.stdout
    assert out.read_text() == ""


# ---------------------------------------------------------------------------------------------------- split_data


def qa(i: int, answer: str = "", system: str | None = None) -> dict:
    record = {"instruction": f"问题 {i}", "output": answer or f"回答 {i}"}
    return record if system is None else {**record, "system": system}


def split_input(tmp_path: Path) -> tuple[Path, list[dict]]:
    """10 distinct prompts, 2 repeated prompts (other answers), 1 same question with another system, 1 invalid."""
    records = [qa(i) for i in range(10)] + [qa(3, "另一个回答"), qa(7, "又一个"), qa(5, system="另一个系统")]
    path = write_jsonl(tmp_path / "all.jsonl", *records[:6], {"instruction": "没有输出"}, *records[6:])
    return path, records


def run_split(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script(
        "split_data",
        "--input",
        str(source),
        "--train_out",
        str(out / "train.jsonl"),
        "--test_out",
        str(out / "test.jsonl"),
        *extra,
    )


def test_split_counts_ratio_and_unchanged_records(tmp_path: Path) -> None:
    source, records = split_input(tmp_path)
    r = run_split(source, tmp_path)
    assert r.returncode == 1
    assert f"{source}:7: output: missing" in r.stdout
    assert "read 14, invalid 1, duplicates removed 0, train 9, test 4" in r.stdout  # round(13 × 0.7) = 9
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert (len(train), len(test)) == (9, 4)
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, records))
    assert "问题".encode() in (tmp_path / "train.jsonl").read_bytes()


def test_split_dedup_by_prompt(tmp_path: Path) -> None:
    source, records = split_input(tmp_path)
    r = run_split(source, tmp_path, "--dedup", "--ratio", "0.5")
    assert (
        "read 14, invalid 1, duplicates removed 2, train 6, test 5" in r.stdout
    )  # round(11 × 0.5) = 6 (half up)
    kept = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "test.jsonl")
    assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, records[:10] + records[12:]))


def test_split_same_seed_same_files_other_seed_other_order(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "all.jsonl", *[qa(i) for i in range(40)])
    outputs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        (tmp_path / name).mkdir()
        r = run_split(source, tmp_path / name, "--seed", seed)
        assert r.returncode == 0 and "read 40, invalid 0, duplicates removed 0, train 28, test 12" in r.stdout
        outputs.append(
            (tmp_path / name / "train.jsonl").read_bytes() + (tmp_path / name / "test.jsonl").read_bytes()
        )
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_split_json_array_in_and_out(tmp_path: Path) -> None:
    out_train, out_test = tmp_path / "train.json", tmp_path / "test.json"
    r = run_script(
        "split_data",
        "--input",
        str(SAMPLE_FILES["sharegpt"]),
        "--train_out",
        str(out_train),
        "--test_out",
        str(out_test),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    train, test = json.loads(out_train.read_text()), json.loads(out_test.read_text())
    assert (len(train), len(test)) == (2, 1)
    assert sorted(map(json.dumps, train + test)) == sorted(
        map(json.dumps, json.loads(SAMPLE_FILES["sharegpt"].read_text()))
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.5"], "--ratio must be between 0 and 1"),
        (["--input", "nope.jsonl"], "nope.jsonl: no such file"),
    ],
)
def test_split_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    r = run_split(SAMPLE_FILES["alpaca"], tmp_path, *extra)
    assert r.returncode == 2 and message in r.stderr
    same = run_script(
        "split_data",
        "--input",
        str(SAMPLE_FILES["alpaca"]),
        "--train_out",
        "x.jsonl",
        "--test_out",
        "x.jsonl",
    )
    assert same.returncode == 2 and "must be different files" in same.stderr


def test_split_and_dedup_functions() -> None:
    train, test = split(list(range(10)), 0.7, seed=42)
    assert (len(train), len(test)) == (7, 3)
    assert sorted(train + test) == list(range(10))
    assert split(list(range(10)), 0.7, seed=42) == (train, test)
    assert split(list(range(10)), 0.7, seed=43) != (train, test)
    assert split([1, 2, 3], 0.0, 1)[0] == [] and split([1, 2, 3], 1.0, 1)[1] == []
    assert dedup(["a", "b", "c", "d"], ["k1", "k2", "k1", "k3"]) == ["a", "b", "d"]


def test_prompt_key_is_the_conversation_before_the_last_assistant_turn() -> None:
    assert prompt_key(Conversation([user("q"), bot("a")])) == prompt_key(
        Conversation([user("q"), bot("b", loss=False)])
    )
    assert prompt_key(TWO_TURNS) != prompt_key(
        Conversation([user("q1"), bot("other"), user("q2"), bot("a2")])
    )
    assert prompt_key(Conversation([user("q"), bot("a")])) != prompt_key(
        Conversation([Message("system", "s"), user("q"), bot("a")])
    )
    assert prompt_key(Conversation([user("q"), bot("a")])) != prompt_key(
        Conversation([user("q"), bot("a")], tools=["t"])
    )


# ---------------------------------------------------------------------------------------------------- format_advertise_gen


ADGEN_LINES = [
    {"content": "类型#裙*颜色#红色*风格#复古", "summary": "复古的红色连衣裙，优雅大方。"},
    {"content": "类型#上衣*材质#牛仔布", "summary": "百搭的牛仔上衣。"},
    {"content": "类型#裤*版型#宽松", "summary": "宽松的阔腿裤，舒适又显瘦。"},
]


def test_format_advertise_gen_default_output(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "train.json", *ADGEN_LINES)
    r = run_script("format_advertise_gen", "--path", str(source), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "read 3 records, written 3, invalid 0" in r.stdout
    out = tmp_path / "formatted_data" / "advertise_gen.jsonl"
    assert out.read_text(encoding="utf-8").splitlines() == [
        '{"prompt": "类型#裙*颜色#红色*风格#复古", "response": "复古的红色连衣裙，优雅大方。"}',
        '{"prompt": "类型#上衣*材质#牛仔布", "response": "百搭的牛仔上衣。"}',
        '{"prompt": "类型#裤*版型#宽松", "response": "宽松的阔腿裤，舒适又显瘦。"}',
    ]
    assert [c for _, _, c in load_conversations([str(out)], log=lambda _line: None).records][0].raw


def test_format_advertise_gen_reports_bad_lines(tmp_path: Path) -> None:
    source = tmp_path / "train.json"
    lines = [
        json.dumps(ADGEN_LINES[0], ensure_ascii=False),
        '{"content": "x"}',
        "not json",
        '{"content": "x", "summary": ""}',
    ]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run_script("format_advertise_gen", "--path", str(source), "--out", str(out))
    assert r.returncode == 1
    assert r.stdout.splitlines()[:5] == [
        "3 invalid record(s):",
        f"{source}:2: summary: missing",
        f"{source}:3: (json): invalid JSON: Expecting value (column 1)",
        f"{source}:4: summary: must not be empty on a trained assistant turn",
        "read 4 records, written 1, invalid 3",
    ]
    assert len(read_jsonl(out)) == 1
    missing = run_script("format_advertise_gen", "--path", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


# ---------------------------------------------------------------------------------------------------- format_tool_alpaca


def test_format_tool_alpaca_sample(tmp_path: Path) -> None:
    sample = SAMPLES / "raw" / "tool_alpaca_sample.json"
    out = tmp_path / "tool_alpaca.jsonl"
    r = run_script("format_tool_alpaca", "--path", str(sample), "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        "1 invalid record(s):",
        f"{sample}:2: Instances[1].intermediate_steps[0][0][1]: tool input must be a JSON object string; "
        "invalid JSON: Expecting value (column 1)",
        "read 5 instances, written 4, invalid 1",
        f"wrote {out}",
    ]
    records = read_jsonl(out)
    assert len(records) == 4
    documentation = json.loads(sample.read_text(encoding="utf-8"))[0]["NLDocumentation"]
    assert records[0] == {
        "tools": [documentation],
        "conversations": [
            {
                "role": "user",
                "content": "What's the weather like in Berlin right now? It is at latitude 52.52, longitude 13.41.",
            },
            {"role": "assistant", "content": "I need to get the current weather at the given coordinates."},
            {
                "role": "tool",
                "name": "getCurrentWeather",
                "parameters": {"latitude": 52.52, "longitude": 13.41},
                "observation": 'Status Code: 200. Response: {"temperature": 18.3, "windspeed": 9.7, "weathercode": 1}',
            },
            {
                "role": "assistant",
                "content": "I have the current weather for Berlin.\n"
                "It is 18.3 °C in Berlin right now, with a light wind of 9.7 km/h and a mainly clear sky.",
            },
        ],
    }
    assert [m["content"] for m in records[1]["conversations"] if m["role"] == "assistant"][:2] == [
        "I should get the daily forecast for Tokyo.",
        "The request failed because of the number of days. I only need two days anyway.",
    ]
    assert records[3]["conversations"][1] == {
        "role": "assistant",
        "content": "我需要把 100 美元换算成人民币。",
    }
    for record in records:
        parse_record(record, "multi-turn")
    assert "美元".encode() in out.read_bytes()


def test_react_thought() -> None:
    assert react_thought("I need X.\nAction: f\nAction Input: {}") == "I need X."
    assert react_thought("Thought: I need X.\nAction: f") == "I need X."
    assert react_thought(" I need X.\nASSISTANT Action: f\nASSISTANT Action Input: {}") == "I need X."
    assert react_thought("ASSISTANT Thought: I need X.\nASSISTANT Action: f") == "I need X."
    assert react_thought("Action: f\nAction Input: {}") == ""
    assert react_thought("no action at all") == "no action at all"


def instance(**changes: Any) -> dict:
    base = {
        "input": "q",
        "output": "answer",
        "Final Thought": "done",
        "intermediate_steps": [[["f", '{"a": 1}', "Action: f\nAction Input: {}"], "obs"]],
    }
    return {key: value for key, value in {**base, **changes}.items() if value is not ...}


def entry_errors(entry: Any) -> list[str]:
    return [
        f"{e.field}: {e.message}" if isinstance(e, RecordError) else "ok" for e in tool_alpaca_entry(entry)
    ]


def test_tool_alpaca_instance_with_no_thought_and_no_final_thought() -> None:
    [record] = tool_alpaca_entry({"NLDocumentation": "doc", "Instances": [instance(**{"Final Thought": ""})]})
    assert record == {
        "tools": ["doc"],
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "tool", "name": "f", "parameters": {"a": 1}, "observation": "obs"},
            {"role": "assistant", "content": "answer"},
        ],
    }


def test_tool_alpaca_bad_shapes_are_counted_with_their_place() -> None:
    steps = "intermediate_steps"
    instances = [
        instance(),
        instance(input=...),
        instance(**{"Final Thought": 3}),
        instance(**{steps: [["f", "{}", "log"]]}),
        instance(**{steps: [[["f", "{}"], "obs"]]}),
        instance(**{steps: [[["f", "[1]", "log"], "obs"]]}),
        instance(**{steps: [[["f", "{}", "log"], {"obs": 1}]]}),
        instance(**{steps: {}}),
        "text",
    ]
    assert entry_errors({"NLDocumentation": "doc", "Instances": instances}) == [
        "ok",
        "Instances[1].input: missing",
        "Instances[2].Final Thought: must be a string, got int",
        "Instances[3].intermediate_steps[0]: must be [[tool, tool_input, log], observation], got a list of 3",
        "Instances[4].intermediate_steps[0][0]: must be [tool, tool_input, log], got a list of 2",
        "Instances[5].intermediate_steps[0][0][1]: tool input must be a JSON object string, got JSON list",
        "Instances[6].intermediate_steps[0][1]: must be a string, got object",
        "Instances[7].intermediate_steps: must be a list, got object",
        "Instances[8]: must be an object, got string",
    ]
    assert entry_errors({"Instances": [instance(), instance()]}) == ["NLDocumentation: missing"] * 2
    assert entry_errors({"NLDocumentation": "doc"}) == ["Instances: missing"]
    assert entry_errors([1]) == ["(entry): must be an object, got list"]


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.real_model
def test_ruozhiba_convert_then_split(tmp_path: Path) -> None:
    source = SHARED / "ruozhiba_qa.json"  # ../shared/data is there in CI: missing is a failure
    converted = tmp_path / "ruozhiba_openai.jsonl"
    r = run_script(
        "convert_data", "--input", str(source), "--output_format", "openai", "--output", str(converted)
    )
    assert r.returncode in (0, 1), r.stderr
    read, written, invalid = map(
        int, re.search(r"read (\d+), written (\d+), invalid (\d+)", r.stdout).groups()
    )
    assert read == 1475 and written + invalid == read
    assert len(read_jsonl(converted)) == written
    assert "只剩一个心脏了还能活吗？".encode() in converted.read_bytes()

    r = run_split(converted, tmp_path, "--dedup")
    assert r.returncode == 0, r.stdout
    summary = r.stdout.splitlines()[-2]
    counts = dict(part.rsplit(" ", 1) for part in summary.split(", "))
    counts = {key: int(value) for key, value in counts.items()}
    assert counts["read"] == written and counts["invalid"] == 0
    assert counts["duplicates removed"] + counts["train"] + counts["test"] == written
    assert counts["train"] == int((written - counts["duplicates removed"]) * 0.7 + 0.5)
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert (len(train), len(test)) == (counts["train"], counts["test"])
