"""Published data sets formatted as chatft's records: AdvertiseGen as input-output records
(scripts/format_advertise_gen.py), ToolAlpaca as multi-turn records with tools (scripts/format_tool_alpaca.py).
Every record is written by to_record, so it reads back as the conversation built; what cannot be formatted is a
located problem, left out.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.data.convert import (
    EXIT_INVALID,
    EXIT_OK,
    _not_a_file,
    _print_problems,
    _usage_error,
    write_records,
)
from chatft.data.files import DataFileError, _json_message, read_records
from chatft.data.readers import parse_record
from chatft.data.schema import Conversation, Message, Problem, RecordError, ToolCall
from chatft.data.writers import to_record

_JSON_TYPES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list"}


def _json_type(value: Any) -> str:
    return "object" if isinstance(value, dict) else _JSON_TYPES.get(type(value), type(value).__name__)


@dataclass
class Formatted:
    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    read: int = 0

    @property
    def invalid(self) -> int:
        return self.read - len(self.records)


def advertise_gen_record(raw: Any) -> dict:
    """An AdvertiseGen line {"content", "summary"} as an input-output record {"prompt", "response"}."""
    if isinstance(raw, dict):
        missing = next((key for key in ("content", "summary") if key not in raw), None)
        if missing:
            raise RecordError(missing, "missing")
        raw = {"content": raw["content"], "summary": raw["summary"]}
    return to_record(parse_record(raw, "input-output"), "input-output")


def format_advertise_gen(path: Path) -> Formatted:
    out = Formatted()
    for item in read_records(path):
        out.read += 1
        if isinstance(item, Problem):
            out.problems.append(item)
            continue
        line, raw = item
        try:
            out.records.append(advertise_gen_record(raw))
        except RecordError as e:
            out.problems.append(Problem(str(path), line, e.field, e.message))
    return out


def react_thought(log: str) -> str:
    """The thought of a ReAct log: the text before `Action:`, without a leading `Thought:` label. ToolAlpaca's logs
    prefix lines with the speaker (`ASSISTANT Thought: ...\\nASSISTANT Action: ...`): that label goes too."""
    thought = log.split("Action:", 1)[0]
    thought = re.sub(r"(?:^|\n)[ \t]*ASSISTANT[ \t]*$", "", thought)
    return re.sub(r"^\s*(?:ASSISTANT\s+)?Thought\s*:", "", thought).strip()


def _get(obj: dict, key: str, path: str, kind: type, what: str) -> Any:
    if key not in obj:
        raise RecordError(path, "missing")
    if not isinstance(obj[key], kind):
        raise RecordError(path, f"must be {what}, got {_json_type(obj[key])}")
    return obj[key]


def _text(obj: dict, key: str, path: str) -> str:
    text = _get(obj, key, path, str, "a string")
    if not text.strip():
        raise RecordError(path, "must not be empty")
    return text


def _shape(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else _json_type(value)


def _tool_alpaca_step(step: Any, path: str) -> list[Message]:
    """[[tool, tool_input (JSON string), react log], observation] -> the thought (if any), the call, its result."""
    if not isinstance(step, list) or len(step) != 2:
        raise RecordError(path, f"must be [[tool, tool_input, log], observation], got {_shape(step)}")
    if not isinstance(step[0], list) or len(step[0]) != 3:
        raise RecordError(f"{path}[0]", f"must be [tool, tool_input, log], got {_shape(step[0])}")
    (name, tool_input, log), observation = step
    for value, where in ((name, "[0][0]"), (tool_input, "[0][1]"), (log, "[0][2]"), (observation, "[1]")):
        if not isinstance(value, str):
            raise RecordError(path + where, f"must be a string, got {_json_type(value)}")
    if not name.strip():
        raise RecordError(f"{path}[0][0]", "must not be empty")
    try:
        parameters = json.loads(tool_input)
    except (ValueError, RecursionError) as e:
        raise RecordError(
            f"{path}[0][1]", f"tool input must be a JSON object string; {_json_message(e)}"
        ) from None
    if not isinstance(parameters, dict):
        raise RecordError(
            f"{path}[0][1]", f"tool input must be a JSON object string, got JSON {_json_type(parameters)}"
        )
    thought = react_thought(log)
    call = Message("assistant", "", tool_calls=[ToolCall(name, parameters)])
    said = [Message("assistant", thought)] if thought else []
    return [*said, call, Message("tool", observation, name=name)]


def tool_alpaca_conversation(instance: Any, documentation: str, path: str = "instance") -> Conversation:
    """One ToolAlpaca instance: tools [documentation], the question, per step the thought (left out when empty),
    the call and its observation, and a final assistant turn `Final Thought + "\\n" + output`."""
    if not isinstance(instance, dict):
        raise RecordError(path, f"must be an object, got {_json_type(instance)}")
    question = _text(instance, "input", f"{path}.input")
    answer = _text(instance, "output", f"{path}.output")
    final_thought = _get(instance, "Final Thought", f"{path}.Final Thought", str, "a string")
    steps = _get(instance, "intermediate_steps", f"{path}.intermediate_steps", list, "a list")
    messages = [Message("user", question)]
    for k, step in enumerate(steps):
        messages += _tool_alpaca_step(step, f"{path}.intermediate_steps[{k}]")
    final = f"{final_thought}\n{answer}" if final_thought.strip() else answer
    messages.append(Message("assistant", final))
    return Conversation(messages, tools=[documentation])


def tool_alpaca_entry(entry: Any) -> list[dict | RecordError]:
    """A multi-turn record, or the RecordError that left it out, per instance of one API entry. An entry whose
    instances cannot be listed (not an object, no Instances list) gives one RecordError."""
    if not isinstance(entry, dict):
        return [RecordError("(entry)", f"must be an object, got {_json_type(entry)}")]
    try:
        instances = _get(entry, "Instances", "Instances", list, "a list")
    except RecordError as e:
        return [e]
    try:
        documentation = _text(entry, "NLDocumentation", "NLDocumentation")
    except RecordError as e:
        return [e] * len(instances)
    results: list[dict | RecordError] = []
    for j, instance in enumerate(instances):
        try:
            conv = tool_alpaca_conversation(instance, documentation, f"Instances[{j}]")
            results.append(to_record(conv, "multi-turn"))
        except RecordError as e:
            results.append(e)
    return results


def format_tool_alpaca(path: Path) -> Formatted:
    """Every instance of every entry; `read` counts instances (an entry without an Instances list counts as one)."""
    out = Formatted()
    for item in read_records(path):
        if isinstance(item, Problem):
            out.problems.append(item)
            out.read += 1
            continue
        line, entry = item
        for result in tool_alpaca_entry(entry):
            out.read += 1
            if isinstance(result, RecordError):
                out.problems.append(Problem(str(path), line, result.field, result.message))
            else:
                out.records.append(result)
    return out


def _format_main(
    argv: list[str] | None, description: str, default_out: str, run: Callable[[Path], Formatted], unit: str
) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--path", required=True, help="the input file")
    p.add_argument(
        "--out",
        default=default_out,
        help="output JSON lines file (default: %(default)s, in the current directory)",
    )
    args = p.parse_args(argv)
    if not Path(args.path).is_file():
        return _usage_error(DataFileError(f"{args.path}: {_not_a_file(args.path)}"))
    try:
        out = run(Path(args.path))
        write_records(out.records, args.out)
    except OSError as e:
        return _usage_error(e)
    _print_problems(out.problems)
    print(f"read {out.read} {unit}, written {len(out.records)}, invalid {out.invalid}")
    print(f"wrote {args.out}")
    return EXIT_INVALID if out.invalid else EXIT_OK


def format_advertise_gen_main(argv: list[str] | None = None) -> int:
    return _format_main(
        argv,
        "Format AdvertiseGen (JSON lines of {content, summary}) as input-output JSON lines {prompt, response}. "
        "Bad lines are listed as FILE:LINE: field: problem and left out. "
        "Exit status: 0 all formatted, 1 some lines invalid (the rest still written), 2 usage error.",
        "formatted_data/advertise_gen.jsonl",
        format_advertise_gen,
        "records",
    )


def format_tool_alpaca_main(argv: list[str] | None = None) -> int:
    return _format_main(
        argv,
        "Format ToolAlpaca (a JSON array of API entries {Name, NLDocumentation, Instances}) as multi-turn JSON "
        "lines with tools: one conversation per instance (tools = [NLDocumentation]; the question; per step the "
        "thought before 'Action:' (its 'Thought:' label removed, left out when empty) and a tool turn with name, "
        "parameters and observation; then Final Thought + newline + output, or the output alone when Final "
        "Thought is empty). Instances that cannot be formatted are listed as FILE:ENTRY: field: why (ENTRY: the "
        "1-based element of the array; field e.g. Instances[1].intermediate_steps[0][0][1], 0-based) and left "
        "out. "
        "Exit status: 0 all formatted, 1 some instances invalid (the rest still written), 2 usage error.",
        "formatted_data/tool_alpaca.jsonl",
        format_tool_alpaca,
        "instances",
    )
