"""Reward functions for --stage grpo, in TRL's signature: f(prompts, completions, **columns) -> one float (or None:
no opinion) per completion. The columns chatft gives: reference (the record's answer, "" when none), tools (the
record's tool definitions as JSON text, "" when none), completion_ids, file and record.

Built in, each with its exact rule:
- accuracy: 1.0 when the completion's final answer equals the reference's, else 0.0; None without a reference.
  The final answer of a text: what follows a closing think tag, if any; in it, the last \\boxed{...}; else the text
  after the last "answer:" / "answer is" / "答案：" / "####"; else, when the reference's answer is a number, the last
  number in the text; else the whole text. Equal: as numbers (commas, spaces, a trailing period and $ dropped;
  fractions a/b; within 1e-6 relative) when both read as numbers, else as text (case and runs of white space
  ignored, a trailing period dropped).
- format: 1.0 when the completion is reasoning then an answer: an optional opening think tag (the generation
  prompt may have opened it), non-empty reasoning, exactly one closing tag, a non-empty answer after it; else 0.0.
  The tags are <think> and </think>.
- tool_call: 1.0 when the completion holds at least one tool call in the trained form (<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>) and every call names a tool the record declares with arguments valid against
  that tool's JSON schema (type object, required, properties and their types, enum); else 0.0; None when the
  record declares no tools.
- length: -(completion tokens) / max_completion_length: from 0 (empty) to -1 (the cap), a pressure to be brief.

--reward_funcs also takes path/to/file.py:function. A function that raises or returns the wrong shape stops the
run with the function's name and the sample, before any training step (check_rewards) and during training
(located).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
ANSWER_MARK = re.compile(r"(?:answer\s*(?:is)?\s*[:：]?|答案\s*[:：是]|####)\s*", re.I)
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


class RewardError(ValueError):
    """A reward function that cannot be used: the message names it and the sample."""


def text_of(completion: Any) -> str:
    """A completion as text: TRL passes strings for text prompts, message lists for conversational ones."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def after_thinking(text: str) -> str:
    return text.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in text else text


def as_number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        return float(Fraction(cleaned)) if "/" in cleaned else float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str, numeric: bool = False) -> str:
    """The final answer of a text (module docstring, accuracy)."""
    text = after_thinking(text).strip()
    boxed = BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    marks = list(ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip()
        return rest.splitlines()[0].strip() if rest else ""
    if numeric:
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else ""
    return text


def same_answer(a: str, b: str) -> bool:
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: " ".join(s.strip().rstrip(".").split()).lower()  # noqa: E731
    return norm(a) == norm(b)


def accuracy(prompts: list, completions: list, reference: list[str], **kwargs: Any) -> list[float | None]:
    rewards: list[float | None] = []
    for completion, ref in zip(completions, reference, strict=True):
        if not ref:
            rewards.append(None)
            continue
        wanted = final_answer(ref)
        got = final_answer(text_of(completion), numeric=as_number(wanted) is not None)
        rewards.append(1.0 if same_answer(got, wanted) else 0.0)
    return rewards


def follows_format(text: str) -> bool:
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    if body.count(THINK_CLOSE) != 1 or THINK_OPEN in body:
        return False
    reasoning, answer = body.split(THINK_CLOSE)
    return bool(reasoning.strip()) and bool(answer.strip())


def format(prompts: list, completions: list, **kwargs: Any) -> list[float]:  # noqa: A001 (the reward's name)
    return [1.0 if follows_format(text_of(c)) else 0.0 for c in completions]


def schema_errors(value: Any, schema: dict, path: str = "arguments") -> list[str]:
    """Where value breaks a JSON schema's type / required / properties / enum (the parts tools use)."""
    types = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    kind = schema.get("type")
    if isinstance(kind, str) and kind in types:
        wrong = not isinstance(value, types[kind]) or (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if wrong:
            return [f"{path}: expected {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: not one of {schema['enum']}"]
    errors = []
    if isinstance(value, dict):
        errors += [f"{path}.{name}: missing" for name in schema.get("required", []) if name not in value]
        for name, sub in (schema.get("properties") or {}).items():
            if name in value and isinstance(sub, dict):
                errors += schema_errors(value[name], sub, f"{path}.{name}")
    return errors


def declared_tools(tools_json: str) -> dict[str, dict]:
    """name -> parameters schema of a record's tools (OpenAI's {"type": "function", "function": {...}} or bare)."""
    tools = json.loads(tools_json) if tools_json else []
    found = {}
    for tool in tools if isinstance(tools, list) else []:
        spec = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            found[spec["name"]] = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
    return found


def valid_tool_calls(text: str, tools: dict[str, dict]) -> bool:
    calls = TOOL_CALL.findall(after_thinking(text))
    if not calls:
        return False
    for block in calls:
        try:
            call = json.loads(block)
        except ValueError:
            return False
        if not isinstance(call, dict) or call.get("name") not in tools:
            return False
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return False
        if schema_errors(arguments, tools[call["name"]] or {"type": "object"}):
            return False
    return True


def tool_call(prompts: list, completions: list, tools: list[str], **kwargs: Any) -> list[float | None]:
    rewards: list[float | None] = []
    for completion, tools_json in zip(completions, tools, strict=True):
        declared = declared_tools(tools_json)
        rewards.append(
            None if not declared else 1.0 if valid_tool_calls(text_of(completion), declared) else 0.0
        )
    return rewards


def length_reward(max_completion_length: int) -> Callable[..., list[float]]:
    def length(
        prompts: list, completions: list, completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float]:
        return [-len(ids) / max_completion_length for ids in completion_ids]

    return length


BUILT_IN = {"accuracy": accuracy, "format": format, "tool_call": tool_call}


def import_file(file: Path, prefix: str) -> Any:
    """The module a user's .py file defines (--reward_funcs, --tool_module), imported under prefix_stem; whatever
    its code raises is raised."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reward(spec: str, max_completion_length: int) -> Callable[..., list]:
    """A built-in by name, or path/to/file.py:function."""
    if spec == "length":
        return length_reward(max_completion_length)
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise RewardError(
            f"--reward_funcs {spec}: not a built-in ({', '.join([*BUILT_IN, 'length'])}) nor path/to/file.py:function"
        )
    file = Path(path)
    if not file.is_file():
        raise RewardError(f"--reward_funcs {spec}: no such file {path}")
    try:
        module = import_file(file, "chatft_reward")
    except Exception as e:  # the user's file: whatever it raises, it is their file's problem, said as such
        raise RewardError(f"--reward_funcs {spec}: {path} did not load: {type(e).__name__}: {e}") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"--reward_funcs {spec}: {path} has no function {name}")
    return function


def reward_name(function: Callable) -> str:
    return getattr(function, "__name__", type(function).__name__)


def checked(function: Callable[..., list]) -> Callable[..., list]:
    """The function, stopping the run with its name and the first sample when it raises or answers wrongly."""

    def call(prompts: list, completions: list, **columns: Any) -> list:
        try:
            rewards = function(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # a user's function: any exception is reported with where it happened
            raise RewardError(f"reward function {reward_name(function)} raised {type(e).__name__}: {e} "
                              f"{sample_text(completions, columns)}") from e  # fmt: skip
        problem = shape_problem(rewards, len(completions))
        if problem:
            raise RewardError(
                f"reward function {reward_name(function)} {problem} {sample_text(completions, columns)}"
            )
        return rewards

    call.__name__ = reward_name(function)  # TRL logs rewards/<name>/mean
    return call


def shape_problem(rewards: Any, expected: int) -> str | None:
    if not isinstance(rewards, list | tuple):
        return f"returned {type(rewards).__name__}, not a list of {expected} floats"
    if len(rewards) != expected:
        return f"returned {len(rewards)} values for {expected} completions"
    bad = [
        r
        for r in rewards
        if r is not None and (not isinstance(r, int | float) or isinstance(r, bool) or not math.isfinite(r))
    ]
    if bad:
        return f"returned {bad[0]!r}: each reward must be a finite number or None"
    return None


def sample_text(completions: list, columns: dict) -> str:
    where = ""
    if columns.get("file") and columns.get("record"):
        where = f" on {columns['file'][0]}:{columns['record'][0]}"
    return f"(first sample{where}: completion {text_of(completions[0])[:80]!r})" if completions else ""


def check_rewards(functions: list[Callable], rows: list[dict], max_completion_length: int) -> None:
    """Each function called before training on a few records, with two completions each (the reference and an
    empty one): one that raises or answers in the wrong shape stops the run (RewardError)."""
    from transformers import TrainerState

    for row in rows:
        completions = [row["reference"], ""]
        columns = {key: [row[key]] * 2 for key in row if key != "prompt"}
        columns["completion_ids"] = [[0] * min(len(row["reference"]), max_completion_length), []]
        # what TRL passes besides the columns: a state before any step, and loggers that keep nothing
        columns |= {"trainer_state": TrainerState(), "log_extra": _ignore, "log_metric": _ignore}
        for function in functions:
            function([row["prompt"]] * 2, completions, **columns)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
