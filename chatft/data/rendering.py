"""Chat templates and how a Conversation is rendered by one: the native templates (chatml, chatglm3) or the
tokenizer's own, the canonical messages converted to the template's message dicts (tools and tool turns as
documented text where the template has no notion of them), chat_template_kwargs checked and passed to every
rendering. Inference renders its prompts here too, exactly as training did.
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from chatft.data.schema import Conversation, Message, ToolCall

TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"


class TemplateError(ValueError):
    """The conversation cannot be rendered exactly with this template."""


# --- renderings of tools for templates that have no notion of them (Qwen2.5/Hermes style, documented) ---


def tools_system_text(tools: Any) -> str:
    """Tool definitions as system text: ChatGLM3's fixed preamble, then the definitions as indented JSON."""
    return TOOLS_PREAMBLE + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def tool_call_text(calls: list[ToolCall]) -> str:
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )


def tool_response_text(content: str) -> str:
    return "<tool_response>\n" + content + "\n</tool_response>"


def chatglm3_tool_call(call: ToolCall) -> str:
    """ChatGLM3's tool call: a python code block `tool_call(key=value, ...)`, as its fine-tuning demo wrote it."""
    keywords = [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in call.arguments.items()]
    code = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords))
    return "```python\n" + code + "\n```"


# --- templates: a Jinja chat template plus the conversion of canonical messages to its message dicts ---


@dataclass
class Rendered:
    """Message dicts for a Jinja template, whether each is a trained turn, and the tools to pass it."""

    messages: list[dict]
    trained: list[bool]
    tools: Any = None

    def add(self, message: dict, trained: bool = False) -> None:
        self.messages.append(message)
        self.trained.append(trained)


@dataclass(frozen=True)
class Template:
    name: str
    chat_template: str | None  # None: the tokenizer's own
    to_dicts: Callable[[Conversation, bool], Rendered]  # (conversation, template has native tools) -> dicts
    # chat_template_kwargs: extra variables for every rendering (training, check_data, inference alike)
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


def _with_reasoning(message: dict, m: Message) -> dict:
    """The dict with the message's reasoning as `reasoning_content` (what Qwen3- and DeepSeek-style templates
    read), when it has one."""
    return message if m.reasoning is None else {**message, "reasoning_content": m.reasoning}


def _generic_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    """OpenAI-style message dicts. Without native tool support, tools and tool turns become documented text. An
    assistant turn with both text and tool calls keeps both."""
    native = tools_native and _is_tool_schema_list(conv.tools)
    out = Rendered([], [], conv.tools if native else None)
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            if native:
                calls = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
                message = {"role": "assistant", "content": m.content, "tool_calls": calls}
            else:
                text = (m.content + "\n" if m.content else "") + tool_call_text(m.tool_calls)
                message = {"role": "assistant", "content": text}
            out.add(_with_reasoning(message, m), m.trained)
        elif m.role == "tool":
            if native:
                out.add({"role": "tool", "content": m.content, "name": m.name})
            else:
                out.add({"role": "user", "content": tool_response_text(m.content)})
        else:
            out.add(_with_reasoning({"role": m.role, "content": m.content}, m), m.trained)
    if conv.tools is not None and not native:
        text = tools_system_text(conv.tools)
        if out.messages and out.messages[0]["role"] == "system":
            out.messages[0] = {"role": "system", "content": out.messages[0]["content"] + "\n\n" + text}
        else:
            out.messages.insert(0, {"role": "system", "content": text})
            out.trained.insert(0, False)
    return out


def _chatglm3_dicts(conv: Conversation, tools_native: bool) -> Rendered:
    """ChatGLM3's messages: a tool call is an assistant message of its own (metadata: the tool's name); text
    written beside tool calls comes first, as an assistant message of its own (ChatGLM3 has no other place for
    it). ChatGLM3 has no place for reasoning: a record with some is refused (plan_examples)."""
    out = Rendered([], [])
    if conv.tools is not None:
        out.add({"role": "system", "content": tools_system_text(conv.tools)})
    for m in conv.messages:
        if m.role == "assistant" and m.tool_calls:
            if m.content:
                out.add({"role": "assistant", "content": m.content}, m.trained)
            for c in m.tool_calls:
                out.add(
                    {"role": "assistant", "metadata": c.name, "content": chatglm3_tool_call(c)}, m.trained
                )
        elif m.role == "tool":
            out.add({"role": "observation", "content": m.content})
        else:
            out.add(_with_reasoning({"role": m.role, "content": m.content}, m), m.trained)
    return out


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatGLM3: [gMASK]sop, then <|role|>{metadata}\n{content} per message; the turn ends at the next role token or
# EOS. The generation prompt is only <|assistant|>: the metadata line (a tool's name) is the model's to write.
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>{{ message.get('metadata', '') }}\n"
    "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

NATIVE_TEMPLATES = {
    "chatml": Template("chatml", CHATML_TEMPLATE, _generic_dicts),
    "chatglm3": Template("chatglm3", CHATGLM3_TEMPLATE, _chatglm3_dicts),
}


def get_template(
    name: str | None, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: str | dict | None = None
) -> Template:
    """The native template `name`, or the tokenizer's own (name None), rendering with chat_template_kwargs (a
    dict, or its JSON text as --chat_template_kwargs takes it; parse_chat_template_kwargs says what is allowed).
    Inference and serving get the template training used by calling this with the run's saved arguments."""
    kwargs = parse_chat_template_kwargs(chat_template_kwargs)
    if name:
        if name not in NATIVE_TEMPLATES:
            raise TemplateError(
                f"unknown --template {name!r}; native templates: {', '.join(NATIVE_TEMPLATES)}"
            )
        return replace(NATIVE_TEMPLATES[name], kwargs=kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer has no chat template; choose a native one with --template ({', '.join(NATIVE_TEMPLATES)})"
        )
    return Template("tokenizer", None, _generic_dicts, kwargs)


# apply_chat_template's own parameters: a template variable of the same name would be taken as one of them
_RESERVED_KWARGS = frozenset(
    name
    for name in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    if name not in ("self", "kwargs")
) | {"messages"}


def parse_chat_template_kwargs(value: str | dict | None) -> dict[str, Any]:
    """--chat_template_kwargs as a dict: a JSON object (text) or a dict; None or "" is {}. ValueError, saying why,
    for anything else or for a name apply_chat_template keeps for itself (add_generation_prompt, tools, ...)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(
                f'--chat_template_kwargs must be a JSON object like {{"enable_thinking": false}}: {e}'
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"--chat_template_kwargs must be a JSON object, got {type(value).__name__}")
    reserved = sorted(k for k in value if k in _RESERVED_KWARGS)
    if reserved:
        raise ValueError(
            f"--chat_template_kwargs cannot set {', '.join(reserved)}: chatft sets it for each rendering"
        )
    return dict(value)


def template_supports_tools(template: Template, tokenizer: PreTrainedTokenizerBase) -> bool:
    source = template.chat_template or tokenizer.chat_template
    if isinstance(source, dict):  # several named templates: the default one is used
        source = source.get("default", "")
    return "tool_calls" in source and "tools" in source


def _is_tool_schema_list(tools: Any) -> bool:
    return isinstance(tools, list) and all(isinstance(t, dict) for t in tools)


def _render(tokenizer, template: Template, msgs: list[dict], tools: Any, generation_prompt: bool) -> str:
    if not msgs:
        return ""
    try:
        return tokenizer.apply_chat_template(
            msgs,
            tools=tools,
            chat_template=template.chat_template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
            **template.kwargs,
        )
    except (
        Exception
    ) as e:  # jinja raises whatever the template's author chose (raise_exception, TypeError, ...)
        raise TemplateError(f"the chat template failed to render: {e}") from e


def render_generation_prompt(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    """What inference encodes: the conversation so far and the header of the assistant turn to generate, rendered
    exactly as training rendered it (same message dicts, same template, same chat_template_kwargs)."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    return _render(tokenizer, template, r.messages, r.tools, True)


def render_conversation(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: Template) -> str:
    """The whole conversation as the template renders it (no generation prompt)."""
    r = template.to_dicts(conv, template_supports_tools(template, tokenizer))
    return _render(tokenizer, template, r.messages, r.tools, False)
