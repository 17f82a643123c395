"""GRPO prompts from records of any chat format chatft reads: each record's conversation up to its last user turn,
rendered with the model's own template and its generation prompt (tools included, as SFT renders them), and the
answer that follows it, when there is one, as the reference the reward functions get.

A record's prompt is its conversation up to its last user message; the assistant answer right after that message,
when there is one (its tool calls written as training writes them), is the reference. Input-output
records are raw prompts (the prompt text with the tokenizer's prefix tokens, no chat markup).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets

from chatft.data.formats import load_conversations
from chatft.data.schema import Conversation, Problem
from chatft.data.templates import Template, TemplateError, render_generation_prompt, with_prefix_tokens
from chatft.inference.evaluation import split_last_answer


@dataclass
class PreparedPrompts:
    dataset: datasets.Dataset  # prompt (text), prompt_ids, reference, tools (JSON text), file, record
    problems: list[Problem] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    records_read: int = 0


def prompt_and_reference(conv: Conversation) -> tuple[Conversation, str | None]:
    """(the conversation up to its last user turn, the assistant answer right after it, or None)."""
    last_user = max((i for i, m in enumerate(conv.messages) if m.role == "user"), default=None)
    if last_user is None:
        raise TemplateError("no user message: nothing to answer")
    prompt = Conversation(conv.messages[: last_user + 1], tools=conv.tools, raw=conv.raw)
    if last_user == len(conv.messages) - 1:
        return prompt, None
    if conv.messages[last_user + 1].role != "assistant":
        raise TemplateError("the last user message must be followed by an assistant answer, or by nothing")
    return prompt, split_last_answer(Conversation(conv.messages[: last_user + 2], conv.tools, conv.raw))[1]


def prepare_prompts(
    paths: list[str],
    fmt: str,
    tokenizer: Any,
    template: Template | None,
    max_prompt_length: int | None,
    log: Callable[[str], Any] = print,
) -> PreparedPrompts:
    """Every record read and validated; a record that cannot be a prompt (or whose prompt is longer than
    max_prompt_length tokens) becomes a located problem, never an exception."""
    loaded = load_conversations(paths, fmt, log)
    rows: dict[str, list] = {k: [] for k in ("prompt", "prompt_ids", "reference", "tools", "file", "record")}
    problems = list(loaded.problems)
    for file, line, conv in loaded.records:
        try:
            prompt, reference = prompt_and_reference(conv)
            if prompt.raw:
                text = prompt.messages[-1].content
                ids = with_prefix_tokens(tokenizer, text)
            else:
                if template is None:
                    raise TemplateError("the tokenizer has no chat template: choose one with --template")
                text = render_generation_prompt(prompt, tokenizer, template)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except TemplateError as e:
            problems.append(Problem(file, line, "(template)", str(e)))
            continue
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            problems.append(
                Problem(file, line, "(length)", f"the prompt is {len(ids)} tokens, over --max_prompt_length")
            )
            continue
        for key, value in (("prompt", text), ("prompt_ids", ids), ("reference", reference or ""),
                           ("tools", json.dumps(conv.tools, ensure_ascii=False) if conv.tools else ""),
                           ("file", file), ("record", line)):  # fmt: skip
            rows[key].append(value)
    log(f"prompts: {len(rows['prompt'])} of {loaded.records_read} record(s), "
        f"{sum(1 for r in rows['reference'] if r)} with a reference answer")  # fmt: skip
    return PreparedPrompts(datasets.Dataset.from_dict(rows), problems, loaded.formats, loaded.records_read)
