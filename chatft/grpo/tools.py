"""Tool-using rollouts for --stage grpo (--tool_module file.py): the model's tool calls run, their results fed
back through the chat template, and the model goes on from there; only the model's own tokens are trained.

A rollout (tool_rollouts, TRL's rollout_func): the completions of a batch of prompts are generated together as TRL
generates them (its sampling settings, stopping at the template's end-of-turn tokens); each whose last turn holds
tool calls in the trained form (chatft.inference.toolcalls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
ChatGLM3's code block) has them run: each call to a function of the module that the record declares (its
`tools`), with the call's arguments, cut after --tool_timeout seconds; an unknown or undeclared tool, bad
arguments, an exception or a timeout become the result {"error": "..."} (the model is shown what went wrong, as
TRL does). The results are rendered as the template renders tool results after an assistant turn with calls
(tool_suffix_ids: the template's own text between the end of that turn and the next generation prompt, found on
a dummy conversation, as TRL finds it), appended, and generation goes on; at most --max_tool_calling_iterations
rounds a rollout, and never past --max_completion_length (a result that would leave no room ends the rollout
there). The appended result tokens get env_mask 0: TRL leaves them out of the loss (its tool_mask), and out of the
completion lengths it logs.
"""

from __future__ import annotations

import inspect
import json
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatft.data.rendering import Template, render_conversation, render_generation_prompt
from chatft.data.schema import Conversation, Message, ToolCall
from chatft.grpo.rewards import import_file
from chatft.inference.toolcalls import parse_tool_calls


class ToolModuleError(ValueError):
    """A --tool_module that cannot be used (located)."""


def load_tool_module(path: str) -> dict[str, Callable]:
    """The module's public functions by name (those defined in it, not imported into it)."""
    file = Path(path)
    if not file.is_file():
        raise ToolModuleError(f"--tool_module {path}: no such file")
    try:
        module = import_file(file, "chatft_tools")
    except Exception as e:  # the user's module: whatever it raises is reported, located
        raise ToolModuleError(f"--tool_module {path}: importing it raised {type(e).__name__}: {e}") from e
    functions = {
        name: f
        for name, f in vars(module).items()
        if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__
    }
    if not functions:
        raise ToolModuleError(f"--tool_module {path}: defines no function")
    return functions


def declared_names(tools_json: str) -> set[str]:
    """The tool names a record declares (its tools column: JSON text, OpenAI-style or bare function schemas)."""
    tools = json.loads(tools_json) if tools_json else []
    names = set()
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return names


def check_tool_module(functions: dict[str, Callable], rows: list[dict], path: str) -> None:
    """Every tool the prompts declare has a function in the module (else the first missing one, located)."""
    declared_any = False
    for row in rows:
        names = declared_names(row["tools"])
        declared_any = declared_any or bool(names)
        missing = sorted(names - functions.keys())
        if missing:
            raise ToolModuleError(
                f"{row['file']}:{row['record']}: tools: {', '.join(missing)} declared, but --tool_module {path} "
                f"has no function of that name (it has {', '.join(sorted(functions))})"
            )
    if not declared_any:
        raise ToolModuleError(f"--tool_module {path}: no prompt declares tools (records need a tools field)")


@contextmanager
def _time_limit(seconds: float):
    """Raises TimeoutError in the code it holds after `seconds` (SIGALRM: the main thread only, Python code)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame):
        raise TimeoutError(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_call(functions: dict[str, Callable], declared: set[str], call: dict, timeout: float) -> str:
    """One call's result as the text the model is shown: the function's return value (JSON for anything but a
    string), or {"error": ...}."""
    name = call["function"]["name"]
    try:
        if name not in declared:
            raise LookupError(f"tool {name!r} is not among the tools this prompt offers")
        arguments = json.loads(call["function"]["arguments"] or "{}")
        if not isinstance(arguments, dict):
            raise TypeError("the arguments must be a JSON object")
        with _time_limit(timeout):
            result = functions[name](**arguments)
    except Exception as e:  # the user's function, or the model's call: shown to the model, never fatal
        return json.dumps({"error": f"{type(e).__name__}: {e}"}, ensure_ascii=False)
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def tool_suffix_ids(
    tokenizer, template: Template, name: str, results: list[str], closers: list[int]
) -> list[int]:
    """The ids the template puts between the end of an assistant turn with calls (its closing token) and the next
    generation prompt, with these results: rendered on a dummy conversation with and without them."""
    calls = Message("assistant", "", tool_calls=[ToolCall(name, {})])
    turn = Conversation([Message("user", "dummy"), calls])
    answered = Conversation([*turn.messages, *(Message("tool", r, name=name) for r in results)])
    prefix = tokenizer(render_conversation(turn, tokenizer, template), add_special_tokens=False)["input_ids"]
    full = tokenizer(render_generation_prompt(answered, tokenizer, template), add_special_tokens=False)[
        "input_ids"
    ]
    ends = [i for i, t in enumerate(prefix) if t in closers]
    if ends:
        prefix = prefix[: ends[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ToolModuleError(
            "the chat template renders an assistant turn with tool calls differently once tool results follow, so "
            "the results cannot be appended to a rollout"
        )
    return full[len(prefix) :]


def tool_rollouts(
    functions: dict[str, Callable],
    tokenizer,
    template: Template,
    prompt_ids: dict[str, list[int]],
    prompt_tools: dict[str, str],
    closers: list[int],
    timeout: float,
) -> Callable[[list, Any], dict]:
    """TRL's rollout_func for tool-using rollouts (module docstring)."""

    def rollout(prompts: list, trainer) -> dict:
        ids = [list(prompt_ids[p]) for p in prompts]
        declared = [declared_names(prompt_tools.get(p, "")) for p in prompts]
        budget = trainer.max_completion_length
        rounds = trainer.max_tool_calling_iterations
        completions, _ = trainer._generate_single_turn(ids, None, {}, 1)
        completions = [list(c) for c in completions]
        masks = [[1] * len(c) for c in completions]
        segment = [0] * len(prompts)  # where each rollout's latest turn of the model's starts
        going, done_rounds = list(range(len(prompts))), 0
        while going and done_rounds < rounds:
            done_rounds += 1
            more = []
            for i in going:
                own = completions[i][segment[i] :]
                if not own or own[-1] not in closers:
                    continue  # cut by the length cap, not ended: no call to run
                text = tokenizer.decode(own[:-1], skip_special_tokens=False)
                _, calls = parse_tool_calls(text, template.name)
                if not calls:
                    continue
                results = [run_call(functions, declared[i], c, timeout) for c in calls]
                suffix = tool_suffix_ids(tokenizer, template, calls[0]["function"]["name"], results, closers)
                if len(completions[i]) + len(suffix) >= budget:
                    continue  # no room left to answer after the results
                completions[i] += suffix
                masks[i] += [0] * len(suffix)
                more.append(i)
            if not more:
                break
            going = more
            continued, _ = trainer._generate_single_turn([ids[i] + completions[i] for i in more], None, {}, 1)
            for i, new in zip(more, continued, strict=True):
                new = list(new)[: budget - len(completions[i])]
                segment[i] = len(completions[i])
                completions[i] += new
                masks[i] += [1] * len(new)
        return {"prompt_ids": ids, "completion_ids": completions, "logprobs": None, "env_mask": masks}

    return rollout
