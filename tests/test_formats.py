"""Tests for chatft.data.formats: file reading, detection, every format's rules, located problems."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatft.data.formats import (
    FORMAT_NAMES,
    DataFileError,
    LoadedData,
    detect_format,
    expand_paths,
    load_conversations,
    parse_record,
    read_records,
)
from chatft.data.schema import Conversation, Message, Problem, RecordError, ToolCall

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data"
SHARED = REPO.parent / "shared" / "data"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def load(*paths: Path | str, fmt: str = "auto") -> LoadedData:
    return load_conversations([str(p) for p in paths], fmt, log=lambda _line: None)


def problems(*paths: Path | str, fmt: str = "auto") -> list[str]:
    return [str(p) for p in load(*paths, fmt=fmt).problems]


def error(record: Any, fmt: str) -> str:
    with pytest.raises(RecordError) as caught:
        parse_record(record, fmt)
    return f"{caught.value.field}: {caught.value.message}"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict:
    return {"role": "assistant", "content": text, **extra}


# ---------------------------------------------------------------------------------------------------- files


def test_expand_paths_files_and_sorted_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("b.jsonl", "a.json", "notes.txt", "c.jsonl"):
        write(folder, name, "")
    (folder / "sub.json").mkdir()
    single = write(tmp_path, "single.txt", "")
    assert expand_paths([str(single), str(folder)]) == [
        single,
        folder / "a.json",
        folder / "b.jsonl",
        folder / "c.jsonl",
    ]


def test_expand_paths_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, "readme.md", "")
    with pytest.raises(DataFileError, match=r"^.*/missing\.jsonl: no such file or directory$"):
        expand_paths([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataFileError, match=r"/empty: no \.json or \.jsonl files in this directory$"):
        expand_paths([str(empty)])
    with pytest.raises(DataFileError, match="^no data files given$"):
        expand_paths([])
    assert issubclass(DataFileError, ValueError)


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n\n   \n[1, 2]\r\n"text"\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (4, [1, 2]), (5, "text")]


def test_read_bom_jsonl_and_json_array(tmp_path: Path) -> None:
    lines = write(tmp_path, "x.jsonl", b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    array = write(tmp_path, "y.json", b'\xef\xbb\xbf  [{"a": 1}, {"a": 2}]')
    assert list(read_records(lines)) == [(1, {"a": 1}), (2, {"a": 2})]
    assert list(read_records(array)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_json_array_records_are_numbered_by_element(tmp_path: Path) -> None:
    path = write(tmp_path, "x.json", '[\n  {"a": 1},\n\n  {"a": 2},\n  3\n]\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (2, {"a": 2}), (3, 3)]


def test_json_file_not_starting_with_bracket_is_json_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path, "train.json", '\n{"content": "a", "summary": "b"}\n{"content": "c", "summary": "d"}\n'
    )
    assert list(read_records(path)) == [
        (2, {"content": "a", "summary": "b"}),
        (3, {"content": "c", "summary": "d"}),
    ]


def test_jsonl_starting_with_bracket_is_still_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", "[1, 2]\n[3]\n")
    assert list(read_records(path)) == [(1, [1, 2]), (2, [3])]


def test_malformed_line_in_jsonl_keeps_following_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n{"a": \n{"a": 3}\n')
    assert list(read_records(path)) == [
        (1, {"a": 1}),
        Problem(str(path), 2, "(json)", "invalid JSON: Expecting value (column 7)"),
        (3, {"a": 3}),
    ]


def test_invalid_utf8_on_line_3_is_reported_on_line_3(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": "\xff"}\n{"a": 4}\n')
    assert list(read_records(path)) == [
        (1, {"a": 1}),
        (2, {"a": 2}),
        Problem(str(path), 3, "(utf-8)", "invalid UTF-8 byte 0xff at byte 8 of the line"),
        (4, {"a": 4}),
    ]


def test_invalid_utf8_in_json_array_loses_only_its_element(tmp_path: Path) -> None:
    path = write(tmp_path, "x.json", b'[\n  {"a": 1},\n  {"a": "\xc3("},\n  {"a": 3}\n]\n')
    assert list(read_records(path)) == [
        (1, {"a": 1}),
        Problem(str(path), 2, "(utf-8)", "invalid UTF-8 byte 0xc3 (line 3 column 10 of the file)"),
        (3, {"a": 3}),
    ]


def test_broken_element_of_a_json_array_is_one_problem_and_the_others_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.json",
        '[\n  {"a": 1},\n  {"a": 2,},\n  {"a": "x, ] {"},\n  {"b": [1, 2} ,\n  {"a": 5},\n  {"a": 6}\n  {"a": 7},\n'
        "  8\n]\n",
    )
    assert list(read_records(path)) == [
        (1, {"a": 1}),
        Problem(
            str(path), 2, "(json)",
            "invalid JSON: Expecting property name enclosed in double quotes (line 3 column 11 of the file)",
        ),
        (3, {"a": "x, ] {"}),  # brackets and commas inside a string do not end an element
        Problem(str(path), 4, "(json)", "invalid JSON: Expecting ',' delimiter (line 5 column 14 of the file)"),
        (5, {"a": 5}),
        (6, {"a": 6}),
        Problem(str(path), 7, "(json)", "invalid JSON: expected ',' or ']' before it (line 8 column 11 of the file)"),
        (8, 8),
    ]  # fmt: skip
    unclosed = write(tmp_path, "y.json", '[{"a": 1}, {"a": 2')
    assert list(read_records(unclosed)) == [
        (1, {"a": 1}),
        Problem(str(unclosed), 2, "(json)", "invalid JSON: Expecting ',' delimiter (line 1 column 19 of the file)"),
    ]  # fmt: skip


def test_problem_string_format() -> None:
    assert (
        str(Problem("data/x.jsonl", 7, "messages[0].role", "missing"))
        == "data/x.jsonl:7: messages[0].role: missing"
    )


# ---------------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": []}, "openai"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "hi"}]}, "multi-turn"),
        ({"conversations": ["junk", {"value": "hi"}]}, "sharegpt"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"prompt": "q", "response": "a"}, "input-output"),
        ({"content": "q", "summary": "a"}, "input-output"),
        ({"conversations": []}, None),
        ({"instruction": "q"}, None),
        ({"text": "plain"}, None),
        (["messages"], None),
        ("messages", None),
    ],
)
def test_detect_format(record: Any, expected: str | None) -> None:
    assert detect_format(record) == expected


def test_auto_detection_per_file_and_log(tmp_path: Path) -> None:
    openai = write(tmp_path, "a.jsonl", jsonl({"messages": [user("hi"), assistant("hello")]}))
    alpaca = write(tmp_path, "b.json", json.dumps([{"instruction": "q", "output": "a"}]))
    lines: list[str] = []
    loaded = load_conversations([str(tmp_path)], log=lines.append)
    assert lines == [f"{openai}: format openai (detected)", f"{alpaca}: format alpaca (detected)"]
    assert loaded.formats == {str(openai): "openai", str(alpaca): "alpaca"}
    assert loaded.records == [
        (str(openai), 1, Conversation([Message("user", "hi"), Message("assistant", "hello")])),
        (str(alpaca), 1, Conversation([Message("user", "q"), Message("assistant", "a")])),
    ]
    assert loaded.problems == []
    assert loaded.records_read == 2


def test_detection_uses_the_first_object_that_parses(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"messages": \n[1]\n' + jsonl({"prompt": "q", "response": "a"}))
    loaded = load(path)
    assert loaded.formats == {str(path): "input-output"}
    assert [str(p) for p in loaded.problems] == [
        f"{path}:1: (json): invalid JSON: Expecting value (column 14)",
        f"{path}:2: (record): must be a JSON object, got list",
    ]
    assert loaded.records == [
        (str(path), 3, Conversation([Message("user", "q"), Message("assistant", "a")], raw=True))
    ]
    assert loaded.records_read == 3


def test_undetectable_file_is_one_problem_and_skipped(tmp_path: Path) -> None:
    bad = write(tmp_path, "a.jsonl", "\n" + jsonl({"text": "x"}, {"messages": [user("hi"), assistant("ok")]}))
    good = write(tmp_path, "b.jsonl", jsonl({"prompt": "q", "response": "a"}))
    lines: list[str] = []
    loaded = load_conversations([str(bad), str(good)], log=lines.append)
    assert lines == [f"{bad}: format unknown, file skipped", f"{good}: format input-output (detected)"]
    assert [str(p) for p in loaded.problems] == [
        f"{bad}:2: (format): cannot detect the format: expected messages (openai), conversations (multi-turn, "
        "sharegpt), instruction+output (alpaca), prompt+response or content+summary (input-output)"
    ]
    assert loaded.formats == {str(good): "input-output"}
    assert len(loaded.records) == 1
    assert loaded.records_read == 3
    assert loaded.invalid == 2


def test_file_without_any_object_record(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '1\n"two"\n{bad\n')
    loaded = load(path)
    assert [str(p) for p in loaded.problems] == [
        f"{path}:1: (record): must be a JSON object, got int",
        f"{path}:2: (record): must be a JSON object, got string",
        f"{path}:3: (json): invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert loaded.formats == {}
    assert loaded.records_read == 3


@pytest.mark.parametrize("content", ["", "\n\n", "[]", " [ ] \n"])
def test_a_file_without_records_is_an_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "x.json", content)
    with pytest.raises(DataFileError, match=f"^{path}: no records in this file"):
        load_conversations([str(path)], log=lambda _m: None)


def test_given_format_is_used_for_every_record(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.jsonl",
        jsonl({"prompt": "q", "response": "a"}, {"messages": [user("q"), assistant("a")]}),
    )
    lines: list[str] = []
    loaded = load_conversations([str(path)], "openai", log=lines.append)
    assert lines == [f"{path}: format openai (given)"]
    assert [str(p) for p in loaded.problems] == [f"{path}:1: messages: missing"]
    assert loaded.records == [(str(path), 2, Conversation([Message("user", "q"), Message("assistant", "a")]))]


def test_unknown_format_name() -> None:
    with pytest.raises(ValueError, match="format must be auto or one of multi-turn, input-output, openai"):
        load_conversations(["x.jsonl"], "chatml", log=lambda _line: None)
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        parse_record({}, "chatml")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_non_object_record_is_an_error_in_every_format(fmt: str) -> None:
    assert error(["a", "b"], fmt) == "(record): must be a JSON object, got list"
    assert error(None, fmt) == "(record): must be a JSON object, got null"


# ---------------------------------------------------------------------------------------------------- multi-turn


def test_multi_turn_basic_with_system_and_loss() -> None:
    record = {
        "conversations": [
            {"role": "system", "content": "你是助手。"},
            user("你好"),
            assistant("你好！", loss=False, extra="ignored"),
            user(""),
            assistant("有什么可以帮你？", loss=True),
        ],
        "id": 7,
    }
    assert parse_record(record, "multi-turn") == Conversation(
        [
            Message("system", "你是助手。"),
            Message("user", "你好"),
            Message("assistant", "你好！", loss=False),
            Message("user", ""),
            Message("assistant", "有什么可以帮你？", loss=True),
        ]
    )


def test_multi_turn_tool_expands_into_call_and_observation() -> None:
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    record = {
        "tools": tools,
        "conversations": [
            user("北京天气？"),
            {
                "role": "tool",
                "name": "get_weather",
                "parameters": {"city": "北京"},
                "observation": {"温度": 23},
            },
            {"role": "tool", "name": "get_weather", "parameters": {}, "observation": "晴", "loss": False},
            {"role": "tool", "name": "get_weather", "parameters": {}, "observation": None},
            assistant("北京晴，23 度。"),
        ],
    }
    assert parse_record(record, "multi-turn") == Conversation(
        [
            Message("user", "北京天气？"),
            Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "北京"})]),
            Message("tool", '{"温度": 23}', name="get_weather"),
            Message("assistant", "", loss=False, tool_calls=[ToolCall("get_weather", {})]),
            Message("tool", "晴", name="get_weather"),
            Message("assistant", "", tool_calls=[ToolCall("get_weather", {})]),
            Message("tool", "null", name="get_weather"),
            Message("assistant", "北京晴，23 度。"),
        ],
        tools=tools,
    )


def test_multi_turn_tools_are_kept_unchanged() -> None:
    record = {"tools": "any JSON", "conversations": [user("q"), assistant("a")]}
    assert parse_record(record, "multi-turn").tools == "any JSON"


def test_multi_turn_empty_assistant_allowed_when_not_trained() -> None:
    record = {"conversations": [user("q"), assistant(" ", loss=False), assistant("a")]}
    assert parse_record(record, "multi-turn").messages[1] == Message("assistant", " ", loss=False)


def test_multi_turn_system_after_assistant_but_before_user_is_allowed() -> None:
    record = {
        "conversations": [assistant("hi"), {"role": "system", "content": "s"}, user("q"), assistant("a")]
    }
    assert [m.role for m in parse_record(record, "multi-turn").messages] == [
        "assistant",
        "system",
        "user",
        "assistant",
    ]


TOOL = {"role": "tool", "name": "f", "parameters": {}, "observation": "ok"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "conversations: missing"),
        ({"conversations": {"role": "user"}}, "conversations: must be a list, got object"),
        ({"conversations": ["hi"]}, "conversations[0]: must be an object, got string"),
        ({"conversations": [{"content": "hi"}]}, "conversations[0].role: missing"),
        (
            {"conversations": [{"role": 1, "content": "hi"}]},
            "conversations[0].role: must be a string, got int",
        ),
        (
            {"conversations": [user("q"), {"role": "bot", "content": "a"}]},
            "conversations[1].role: must be one of system, user, assistant, tool; got 'bot'",
        ),
        ({"conversations": [{"role": "user"}]}, "conversations[0].content: missing"),
        ({"conversations": [user("q"), assistant(5)]}, "conversations[1].content: must be a string, got int"),
        (
            {"conversations": [user("q"), assistant(None)]},
            "conversations[1].content: must be a string, got null",
        ),
        (
            {"conversations": [user("q"), assistant("")]},
            "conversations[1].content: must not be empty on a trained assistant turn",
        ),
        (
            {"conversations": [user("q"), assistant(" \n", loss=True)]},
            "conversations[1].content: must not be empty on a trained assistant turn",
        ),
        (
            {"conversations": [user("q"), assistant("a", loss=1)]},
            "conversations[1].loss: must be a bool, got int",
        ),
        (
            {"conversations": [{"role": "user", "content": "q", "loss": True}, assistant("a")]},
            "conversations[0].loss: loss: true is only allowed on assistant turns",
        ),
        (
            {"conversations": [{"role": "system", "content": "s", "loss": True}, user("q"), assistant("a")]},
            "conversations[0].loss: loss: true is only allowed on assistant turns",
        ),
        (
            {"conversations": [user("q"), {"role": "system", "content": "s"}, assistant("a")]},
            "conversations[1].role: system message must come before the first user message",
        ),
        (
            {
                "conversations": [
                    {"role": "system", "content": "s"},
                    {"role": "system", "content": "t"},
                    user("q"),
                ]
            },
            "conversations[1].role: only one system message is allowed",
        ),
        ({"conversations": [user("q"), {**TOOL, "name": ""}]}, "conversations[1].name: must not be empty"),
        (
            {"conversations": [user("q"), {**TOOL, "name": 3}]},
            "conversations[1].name: must be a string, got int",
        ),
        (
            {"conversations": [user("q"), {k: v for k, v in TOOL.items() if k != "name"}]},
            "conversations[1].name: missing",
        ),
        (
            {"conversations": [user("q"), {**TOOL, "parameters": "{}"}]},
            "conversations[1].parameters: must be an object, got string",
        ),
        (
            {"conversations": [user("q"), {k: v for k, v in TOOL.items() if k != "parameters"}]},
            "conversations[1].parameters: missing",
        ),
        (
            {"conversations": [user("q"), {k: v for k, v in TOOL.items() if k != "observation"}]},
            "conversations[1].observation: missing",
        ),
        (
            {"conversations": [user("q"), {**TOOL, "loss": "yes"}]},
            "conversations[1].loss: must be a bool, got string",
        ),
        ({"conversations": []}, "conversations: needs at least one user message"),
        ({"conversations": [assistant("a")]}, "conversations: needs at least one user message"),
        (
            {"conversations": [{"role": "system", "content": "s"}, user("q")]},
            "conversations: needs at least one assistant message",
        ),
    ],
)
def test_multi_turn_errors(record: dict, expected: str) -> None:
    assert error(record, "multi-turn") == expected


def test_multi_turn_tool_call_counts_as_assistant_message() -> None:
    record = {"conversations": [user("q"), TOOL]}
    assert parse_record(record, "multi-turn").messages[1] == Message(
        "assistant", "", tool_calls=[ToolCall("f", {})]
    )


# ---------------------------------------------------------------------------------------------------- input-output


def test_input_output_prompt_response() -> None:
    record = {"prompt": "翻译：你好", "response": "Hello", "source": "x"}
    assert parse_record(record, "input-output") == Conversation(
        [Message("user", "翻译：你好"), Message("assistant", "Hello")], raw=True
    )


def test_input_output_advertise_gen_content_summary() -> None:
    record = {"content": "类型#裙*颜色#蓝色", "summary": "清新的蓝色连衣裙。"}
    assert parse_record(record, "input-output") == Conversation(
        [Message("user", "类型#裙*颜色#蓝色"), Message("assistant", "清新的蓝色连衣裙。")], raw=True
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "prompt: missing"),
        ({"prompt": "q"}, "response: missing"),
        ({"response": "a"}, "prompt: missing"),
        ({"content": "q"}, "summary: missing"),
        ({"summary": "a"}, "content: missing"),
        ({"prompt": 1, "response": "a"}, "prompt: must be a string, got int"),
        ({"prompt": "q", "response": ["a"]}, "response: must be a string, got list"),
        ({"prompt": " ", "response": "a"}, "prompt: must not be empty"),
        ({"prompt": "q", "response": ""}, "response: must not be empty on a trained assistant turn"),
        ({"content": "", "summary": "a"}, "content: must not be empty"),
        ({"content": "q", "summary": "\t"}, "summary: must not be empty on a trained assistant turn"),
    ],
)
def test_input_output_errors(record: dict, expected: str) -> None:
    assert error(record, "input-output") == expected


# ---------------------------------------------------------------------------------------------------- openai


def test_openai_basic_with_loss_and_extra_keys() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            user("Hi"),
            assistant("", loss=False),
            user("Again"),
            assistant("Hello!", loss=True, weight=1),
        ],
        "meta": {"id": 1},
    }
    assert parse_record(record, "openai") == Conversation(
        [
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "", loss=False),
            Message("user", "Again"),
            Message("assistant", "Hello!", loss=True),
        ]
    )


def test_openai_tool_calls_and_tool_messages() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    record = {
        "tools": tools,
        "messages": [
            user("1+2? and 3+4?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                    },
                    {"id": "c2", "function": {"name": "mul", "arguments": {"a": 3, "b": 4}}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "3"},
            {"role": "tool", "tool_call_id": "c2", "name": "times", "content": "12"},
            {"role": "tool", "tool_call_id": "zz", "content": "?"},
            {"role": "tool", "content": ""},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}],
                "loss": False,
            },
            assistant("Let me check.", tool_calls=[{"function": {"name": "add", "arguments": {}}}]),
            assistant("3 and 12.", tool_calls=[]),
        ],
    }
    assert parse_record(record, "openai") == Conversation(
        [
            Message("user", "1+2? and 3+4?"),
            Message(
                "assistant",
                "",
                tool_calls=[ToolCall("add", {"a": 1, "b": 2}), ToolCall("mul", {"a": 3, "b": 4})],
            ),
            Message("tool", "3", name="add"),
            Message("tool", "12", name="times"),
            Message("tool", "?"),
            Message("tool", ""),
            Message("assistant", "", loss=False, tool_calls=[ToolCall("add", {})]),
            Message("assistant", "Let me check.", tool_calls=[ToolCall("add", {})]),
            Message("assistant", "3 and 12."),
        ],
        tools=tools,
    )


def call(**function: Any) -> dict:
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "messages: missing"),
        ({"messages": "hi"}, "messages: must be a list, got string"),
        ({"messages": [user("q"), assistant("a")], "tools": {"a": 1}}, "tools: must be a list, got object"),
        ({"messages": [user("q"), 7]}, "messages[1]: must be an object, got int"),
        (
            {"messages": [user("q"), {"role": "bot", "content": "a"}]},
            "messages[1].role: must be one of system, user, assistant, tool; got 'bot'",
        ),
        ({"messages": [user("q"), {"content": "a"}]}, "messages[1].role: missing"),
        ({"messages": [{"role": "user"}, assistant("a")]}, "messages[0].content: missing"),
        (
            {"messages": [{"role": "user", "content": None}, assistant("a")]},
            "messages[0].content: must be a string, got null",
        ),
        ({"messages": [user("q"), {"role": "assistant"}]}, "messages[1].content: missing"),
        ({"messages": [user("q"), assistant(None)]}, "messages[1].content: must be a string, got null"),
        (
            {"messages": [user("q"), assistant("   ")]},
            "messages[1].content: must not be empty on a trained assistant turn",
        ),
        (
            {"messages": [user("q"), assistant("a", loss="false")]},
            "messages[1].loss: must be a bool, got string",
        ),
        (
            {"messages": [{"role": "user", "content": "q", "loss": True}, assistant("a")]},
            "messages[0].loss: loss: true is only allowed on assistant turns",
        ),
        (
            {"messages": [user("q"), assistant("a"), {"role": "tool", "content": "r", "loss": True}]},
            "messages[2].loss: loss: true is only allowed on assistant turns",
        ),
        (
            {"messages": [user("q"), {"role": "system", "content": "s"}, assistant("a")]},
            "messages[1].role: system message must be the first message",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, user("q")]},
            "messages[1].role: system message must be the first message",
        ),
        (
            {"messages": [user("q"), assistant("a", tool_calls={"name": "f"})]},
            "messages[1].tool_calls: must be a list, got object",
        ),
        (
            {"messages": [user("q"), assistant("a", tool_calls=["f"])]},
            "messages[1].tool_calls[0]: must be an object, got string",
        ),
        (
            {"messages": [user("q"), assistant("a", tool_calls=[{"type": "code", "function": {}}])]},
            "messages[1].tool_calls[0].type: must be 'function', got 'code'",
        ),
        (
            {"messages": [user("q"), assistant("a", tool_calls=[{"type": "function"}])]},
            "messages[1].tool_calls[0].function: missing",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(arguments="{}")])]},
            "messages[1].tool_calls[0].function.name: missing",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(name="", arguments="{}")])]},
            "messages[1].tool_calls[0].function.name: must not be empty",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(name="f")])]},
            "messages[1].tool_calls[0].function.arguments: missing",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(name="f", arguments="{a: 1}")])]},
            "messages[1].tool_calls[0].function.arguments: must be a JSON object string; invalid JSON: "
            "Expecting property name enclosed in double quotes (column 2)",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(name="f", arguments="[1]")])]},
            "messages[1].tool_calls[0].function.arguments: must be a JSON object string, got JSON list",
        ),
        (
            {"messages": [user("q"), assistant(None, tool_calls=[call(name="f", arguments=3)])]},
            "messages[1].tool_calls[0].function.arguments: must be an object or a JSON object string, got int",
        ),
        (
            {"messages": [user("q"), assistant(3, tool_calls=[call(name="f", arguments={})])]},
            "messages[1].content: must be a string, got int",
        ),
        (
            {"messages": [{**user("q"), "tool_calls": [call(name="f", arguments={})]}, assistant("a")]},
            "messages[0].tool_calls: only allowed on assistant messages",
        ),
        (
            {"messages": [user("q"), assistant("a"), {"role": "tool", "name": "", "content": "r"}]},
            "messages[2].name: must not be empty",
        ),
        (
            {"messages": [user("q"), assistant("a"), {"role": "tool", "name": 1, "content": "r"}]},
            "messages[2].name: must be a string, got int",
        ),
        ({"messages": [user("q"), assistant("a"), {"role": "tool"}]}, "messages[2].content: missing"),
        ({"messages": []}, "messages: needs at least one user message"),
        (
            {"messages": [{"role": "system", "content": "s"}, user("q")]},
            "messages: needs at least one assistant message",
        ),
    ],
)
def test_openai_errors(record: dict, expected: str) -> None:
    assert error(record, "openai") == expected


def test_openai_tool_call_id_that_is_not_a_string_is_ignored() -> None:
    record = {
        "messages": [user("q"), assistant("a"), {"role": "tool", "tool_call_id": ["x"], "content": "r"}]
    }
    assert parse_record(record, "openai").messages[2] == Message("tool", "r")


# ---------------------------------------------------------------------------------------------------- alpaca


def test_alpaca_instruction_and_input() -> None:
    record = {"instruction": "翻译成英文", "input": "你好", "output": "Hello"}
    assert parse_record(record, "alpaca") == Conversation(
        [Message("user", "翻译成英文\n你好"), Message("assistant", "Hello")]
    )


def test_alpaca_empty_or_missing_input_and_system() -> None:
    expected = Conversation([Message("user", "Name a color."), Message("assistant", "Blue.")])
    assert (
        parse_record({"instruction": "Name a color.", "input": "", "output": "Blue."}, "alpaca") == expected
    )
    assert (
        parse_record({"instruction": "Name a color.", "input": " ", "output": "Blue."}, "alpaca") == expected
    )
    assert (
        parse_record({"instruction": "Name a color.", "output": "Blue.", "system": ""}, "alpaca") == expected
    )
    assert (
        parse_record({"instruction": "Name a color.", "input": None, "output": "Blue."}, "alpaca") == expected
    )


def test_alpaca_system_and_history() -> None:
    record = {
        "system": "你是老师。",
        "instruction": "那日本呢？",
        "output": "东京。",
        "history": [["法国首都？", "巴黎。"], ["", "还有问题吗？"]],
    }
    assert parse_record(record, "alpaca") == Conversation(
        [
            Message("system", "你是老师。"),
            Message("user", "法国首都？"),
            Message("assistant", "巴黎。"),
            Message("user", ""),
            Message("assistant", "还有问题吗？"),
            Message("user", "那日本呢？"),
            Message("assistant", "东京。"),
        ]
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"output": "a"}, "instruction: missing"),
        ({"instruction": "q"}, "output: missing"),
        ({"instruction": 1, "output": "a"}, "instruction: must be a string, got int"),
        ({"instruction": " ", "output": "a"}, "instruction: must not be empty"),
        ({"instruction": "q", "output": ""}, "output: must not be empty on a trained assistant turn"),
        ({"instruction": "q", "output": None}, "output: must be a string, got null"),
        ({"instruction": "q", "input": 3, "output": "a"}, "input: must be a string, got int"),
        ({"instruction": "q", "output": "a", "system": ["s"]}, "system: must be a string, got list"),
        ({"instruction": "q", "output": "a", "history": "q a"}, "history: must be a list, got string"),
        (
            {"instruction": "q", "output": "a", "history": [["q", "a"], ["q"]]},
            "history[1]: must be a [question, answer] pair, got list of 1",
        ),
        (
            {"instruction": "q", "output": "a", "history": [{"q": "a"}]},
            "history[0]: must be a [question, answer] pair, got object",
        ),
        (
            {"instruction": "q", "output": "a", "history": [[1, "a"]]},
            "history[0][0]: must be a string, got int",
        ),
        (
            {"instruction": "q", "output": "a", "history": [["q", None]]},
            "history[0][1]: must be a string, got null",
        ),
        (
            {"instruction": "q", "output": "a", "history": [["q", ""]]},
            "history[0][1]: must not be empty on a trained assistant turn",
        ),
    ],
)
def test_alpaca_errors(record: dict, expected: str) -> None:
    assert error(record, "alpaca") == expected


# ---------------------------------------------------------------------------------------------------- sharegpt


def turn(source: str, value: Any) -> dict:
    return {"from": source, "value": value}


def test_sharegpt_basic_and_aliases() -> None:
    record = {
        "conversations": [
            turn("human", "你好"),
            turn("gpt", "你好！"),
            turn("user", "再见"),
            turn("assistant", "再见！"),
        ],
        "id": "x",
    }
    assert parse_record(record, "sharegpt") == Conversation(
        [
            Message("user", "你好"),
            Message("assistant", "你好！"),
            Message("user", "再见"),
            Message("assistant", "再见！"),
        ]
    )


def test_sharegpt_system_tools_function_call_and_observation() -> None:
    tools = [{"name": "weather", "parameters": {"type": "object"}}]
    record = {
        "system": "You can use tools.",
        "tools": json.dumps(tools),
        "conversations": [
            turn("human", "Weather in Paris and Rome?"),
            turn("function_call", '{"name": "weather", "arguments": {"city": "Paris"}}'),
            turn("observation", "sunny"),
            turn(
                "function_call",
                '[{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}, {"name": "t", "arguments": {}}]',
            ),
            turn("observation", "rainy"),
            turn("gpt", "Paris is sunny, Rome is rainy."),
            turn("human", "Thanks, check again."),
            turn("function_call", '{"name": "weather", "arguments": {}}'),
        ],
    }
    assert parse_record(record, "sharegpt") == Conversation(
        [
            Message("system", "You can use tools."),
            Message("user", "Weather in Paris and Rome?"),
            Message("assistant", "", tool_calls=[ToolCall("weather", {"city": "Paris"})]),
            Message("tool", "sunny"),
            Message("assistant", "", tool_calls=[ToolCall("weather", {"city": "Rome"}), ToolCall("t", {})]),
            Message("tool", "rainy"),
            Message("assistant", "Paris is sunny, Rome is rainy."),
            Message("user", "Thanks, check again."),
            Message("assistant", "", tool_calls=[ToolCall("weather", {})]),
        ],
        tools=tools,
    )


def test_sharegpt_leading_system_turn_and_tools_list() -> None:
    record = {
        "tools": [{"name": "f"}],
        "system": "",
        "conversations": [
            turn("system", "你是诗人。"),
            turn("human", "写一句诗"),
            turn("gpt", "春眠不觉晓。"),
        ],
    }
    assert parse_record(record, "sharegpt") == Conversation(
        [Message("system", "你是诗人。"), Message("user", "写一句诗"), Message("assistant", "春眠不觉晓。")],
        tools=[{"name": "f"}],
    )


def test_sharegpt_empty_tools_string_means_none() -> None:
    record = {"tools": "", "conversations": [turn("human", "q"), turn("gpt", "a")]}
    assert parse_record(record, "sharegpt").tools is None


QA = [turn("human", "q"), turn("gpt", "a")]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "conversations: missing"),
        ({"conversations": "q"}, "conversations: must be a list, got string"),
        ({"conversations": [["human", "q"]]}, "conversations[0]: must be an object, got list"),
        ({"conversations": [{"value": "q"}]}, "conversations[0].from: missing"),
        ({"conversations": [{"from": "human"}]}, "conversations[0].value: missing"),
        ({"conversations": [turn("human", 1)]}, "conversations[0].value: must be a string, got int"),
        (
            {"conversations": [turn("human", "q"), turn("bot", "a")]},
            "conversations[1].from: must be one of human, gpt, function_call, observation, system; got 'bot'",
        ),
        (
            {"conversations": [turn("gpt", "a")]},
            "conversations[0].from: expected human or observation here (turns alternate), got 'gpt'",
        ),
        (
            {"conversations": [turn("human", "q"), turn("user", "q2"), turn("gpt", "a")]},
            "conversations[1].from: expected gpt or function_call here (turns alternate), got 'user'",
        ),
        (
            {"conversations": [*QA, turn("assistant", "a2")]},
            "conversations[2].from: expected human or observation here (turns alternate), got 'assistant'",
        ),
        ({"conversations": [turn("human", "q")]}, "conversations: must end with a gpt or function_call turn"),
        (
            {"conversations": [*QA, turn("human", "q2")]},
            "conversations: must end with a gpt or function_call turn",
        ),
        ({"conversations": []}, "conversations: must end with a gpt or function_call turn"),
        (
            {"conversations": [turn("system", "s")]},
            "conversations: must end with a gpt or function_call turn",
        ),
        (
            {"conversations": [turn("observation", "r"), turn("gpt", "a")]},
            "conversations[0].from: observation must follow a function_call turn",
        ),
        (
            {"conversations": [*QA, turn("observation", "r"), turn("gpt", "a")]},
            "conversations[2].from: observation must follow a function_call turn",
        ),
        (
            {"conversations": [turn("human", "q"), turn("gpt", " ")]},
            "conversations[1].value: must not be empty on a trained assistant turn",
        ),
        (
            {"conversations": [*QA, turn("system", "s")]},
            "conversations[2].from: a system turn is only allowed first",
        ),
        (
            {"system": "top", "conversations": [turn("system", "s"), *QA]},
            "conversations[0].from: a system turn cannot be combined with a top-level system",
        ),
        ({"system": 3, "conversations": QA}, "system: must be a string, got int"),
        (
            {"tools": "[{name: 1}]", "conversations": QA},
            "tools: invalid JSON: Expecting property name enclosed in double quotes (column 3)",
        ),
        (
            {"tools": '{"name": "f"}', "conversations": QA},
            "tools: must be a list or a JSON string of one, got object",
        ),
        ({"tools": 5, "conversations": QA}, "tools: must be a list or a JSON string of one, got int"),
        (
            {"conversations": [turn("human", "q"), turn("function_call", "weather(city=Paris)")]},
            "conversations[1].value: must be a JSON string of a function call; invalid JSON: Expecting value (column 1)",
        ),
        (
            {"conversations": [turn("human", "q"), turn("function_call", '"weather"')]},
            'conversations[1].value: must be a JSON {"name", "arguments"} object or a list of them, got JSON string',
        ),
        (
            {"conversations": [turn("human", "q"), turn("function_call", "[]")]},
            'conversations[1].value: must be a JSON {"name", "arguments"} object or a list of them, got an empty list',
        ),
        (
            {"conversations": [turn("human", "q"), turn("function_call", '{"arguments": {}}')]},
            "conversations[1].value.name: missing",
        ),
        (
            {"conversations": [turn("human", "q"), turn("function_call", '{"name": "f"}')]},
            "conversations[1].value.arguments: missing",
        ),
        (
            {
                "conversations": [
                    turn("human", "q"),
                    turn("function_call", '[{"name": "f", "arguments": {}}, 1]'),
                ]
            },
            "conversations[1].value[1]: must be an object, got int",
        ),
        (
            {
                "conversations": [
                    turn("human", "q"),
                    turn("function_call", '[{"name": "f", "arguments": "x"}]'),
                ]
            },
            "conversations[1].value[0].arguments: must be a JSON object string; invalid JSON: Expecting value (column 1)",
        ),
    ],
)
def test_sharegpt_errors(record: dict, expected: str) -> None:
    assert error(record, "sharegpt") == expected


# ---------------------------------------------------------------------------------------------------- loading


def test_load_reports_problems_in_file_order_and_counts(tmp_path: Path) -> None:
    ok = {"messages": [user("q"), assistant("a")]}
    first = write(tmp_path, "a.jsonl", jsonl(ok) + "{oops\n" + jsonl({"messages": [user("q")]}, ok))
    second = write(
        tmp_path,
        "b.json",
        json.dumps([{"instruction": "q", "output": ""}, {"instruction": "q", "output": "a"}]),
    )
    loaded = load(first, second)
    assert [str(p) for p in loaded.problems] == [
        f"{first}:2: (json): invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{first}:3: messages: needs at least one assistant message",
        f"{second}:1: output: must not be empty on a trained assistant turn",
    ]
    assert [(Path(f).name, line) for f, line, _ in loaded.records] == [
        ("a.jsonl", 1),
        ("a.jsonl", 4),
        ("b.json", 2),
    ]
    assert loaded.records_read == 6
    assert loaded.invalid == len(loaded.problems) == 3
    assert loaded.formats == {str(first): "openai", str(second): "alpaca"}


def test_load_missing_path_raises_data_file_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file or directory"):
        load(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------- samples


SAMPLE_FORMATS = {
    "multi_turn.jsonl": ("multi-turn", 4),
    "input_output.jsonl": ("input-output", 4),
    "openai_messages.jsonl": ("openai", 4),
    "alpaca.json": ("alpaca", 4),
    "sharegpt.json": ("sharegpt", 3),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_FORMATS))
def test_sample_files_are_valid(name: str) -> None:
    fmt, count = SAMPLE_FORMATS[name]
    path = SAMPLES / name
    loaded = load(path)
    assert loaded.problems == []
    assert loaded.formats == {str(path): fmt}
    assert len(loaded.records) == loaded.records_read == count


def test_sample_files_show_tools_and_loss_false() -> None:
    for name in ("multi_turn.jsonl", "openai_messages.jsonl", "sharegpt.json"):
        conversations = [c for _, _, c in load(SAMPLES / name).records]
        assert any(m.tool_calls for c in conversations for m in c.messages), name
        assert any(c.tools for c in conversations), name
    for name in ("multi_turn.jsonl", "openai_messages.jsonl"):
        conversations = [c for _, _, c in load(SAMPLES / name).records]
        assert any(m.loss is False for c in conversations for m in c.messages), name


def test_sample_bad_records() -> None:
    path = SAMPLES / "bad_records.jsonl"
    loaded = load(path)
    assert [str(p) for p in loaded.problems] == [
        f"{path}:2: (json): invalid JSON: Expecting ',' delimiter (column 105)",
        f"{path}:3: messages[1].role: must be one of system, user, assistant, tool; got 'bot'",
        f"{path}:4: messages[0].loss: loss: true is only allowed on assistant turns",
        f"{path}:6: messages[0].content: missing",
        f"{path}:7: messages[1].content: must not be empty on a trained assistant turn",
        f"{path}:9: (record): must be a JSON object, got list",
        f"{path}:10: messages[1].loss: must be a bool, got string",
        f"{path}:11: messages[1].role: system message must be the first message",
        f"{path}:12: messages[1].tool_calls[0].function.arguments: must be a JSON object string; invalid JSON: "
        "Expecting property name enclosed in double quotes (column 2)",
        f"{path}:13: messages: needs at least one assistant message",
    ]
    assert [line for _, line, _ in loaded.records] == [1, 5, 14]
    assert loaded.records_read == 13
    assert loaded.formats == {str(path): "openai"}


def test_sample_directory_loads_every_file() -> None:
    loaded = load(SAMPLES)
    assert sorted(Path(f).name for f in loaded.formats) == sorted([*SAMPLE_FORMATS, "bad_records.jsonl"])
    assert len(loaded.records) == sum(count for _, count in SAMPLE_FORMATS.values()) + 3


# ---------------------------------------------------------------------------------------------------- real data


def test_real_ruozhiba_alpaca_array() -> None:
    loaded = load(SHARED / "ruozhiba_qa.json")
    assert loaded.problems == []
    assert loaded.formats == {str(SHARED / "ruozhiba_qa.json"): "alpaca"}
    assert len(loaded.records) == loaded.records_read == 1475
    _, line, first = loaded.records[0]
    assert line == 1
    assert first == Conversation(
        [Message("user", "只剩一个心脏了还能活吗？"), Message("assistant", "能，人本来就只有一个心脏。")]
    )


def test_real_advertise_gen_json_lines() -> None:
    path = SHARED / "AdvertiseGen" / "train.json"
    loaded = load(path)
    assert loaded.problems == []
    assert loaded.formats == {str(path): "input-output"}
    assert len(loaded.records) == loaded.records_read == 960
    _, line, first = loaded.records[0]
    assert line == 1
    assert first.raw is True
    assert first.messages[0] == Message(
        "user", "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞"
    )
    assert [_line for _, _line, _ in loaded.records][-1] == 960
