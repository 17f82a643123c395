"""A model-family matrix for tests: per family, a tokenizer and a tiny random model built in-process, offline.

Each tokenizer is a word-level toy (as in tests/toy.py: words, single digits, single punctuation marks and
white-space runs are single tokens, so "\\n\\n" is one token as in real BPE) carrying the family's own special
tokens, BOS/EOS/PAD/UNK and a chat template written here from the family's documented turn layout (not copied
from any model repository); qwen2.5's is a small byte-level BPE instead (see _qwen2_bpe_tokenizer for the
transformers quirk that forces it). Each tiny model comes from the family's own transformers config class.

What each template reproduces and what it simplifies (tests/test_families_fixtures.py holds each family's
rendering of [user "hi", assistant "hello there"], written from the documentation):

- smollm2: ChatML, with SmolLM2-Instruct's default system prompt "You are a helpful AI assistant named SmolLM,
  trained by Hugging Face" when the conversation has none. No tools (the real one has none). bos <|im_start|>,
  eos = pad <|im_end|>, unk <|endoftext|>; no BOS added on encode.
- llama3: Llama-3.1-Instruct: BOS, a system header that is always there ("Cutting Knowledge Date: December
  2023\\nToday Date: 26 Jul 2024\\n\\n" + the trimmed system text), then
  <|start_header_id|>role<|end_header_id|>\\n\\n{content|trim}<|eot_id|> per message; generation prompt = the
  assistant header. Tools as 3.1 does by default: "Environment: ipython" in the system header and the tool
  definitions (JSON, indent 4) in the first user message; one tool call per assistant message as
  {"name": ..., "parameters": ...}<|eot_id|>; tool results in an "ipython" turn, JSON-encoded (a string
  result is rendered with its quotes, as in the real template). Simplified: no built-in tools (no
  <|python_tag|>, no <|eom_id|> turn ends) and the date is fixed (3.2's template uses today's date).
  eos = <|eot_id|> (the newer Llama-3/3.1-Instruct tokenizer_config; older releases said <|end_of_text|>),
  no pad, no unk; BOS added on encode.
- qwen2.5: ChatML with "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." as default
  system; tools Hermes style: "# Tools" preamble with <tools> JSON lines appended to the system turn,
  <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call> in assistant turns, consecutive tool results as
  <tool_response>\\n...\\n</tool_response> inside one user turn. eos <|im_end|>, pad <|endoftext|>, no
  bos/unk. <tool_call>/</tool_call> are added tokens that are not special, as in Qwen2.5 (it has no
  <tool_response> token: that one is text here too). The tokenizer is a Qwen2Tokenizer (byte-level BPE,
  Qwen's split pattern) trained here on the shared words and the sample renderings: " there" is one token,
  as in Qwen, and no text is unknown.
- qwen3: ChatML, no default system, Qwen3's tools (as Qwen2.5's, without default system) and its reasoning:
  an assistant turn after the last real user query is rendered <think>\\n{reasoning}\\n</think>\\n\\n{content}
  when it has reasoning (reasoning_content, or a </think> inside content) OR IS THE LAST MESSAGE: the real
  template gives the final assistant turn an empty think block even without reasoning, and drops think blocks
  of turns before the last query; generation prompt <|im_start|>assistant\\n, plus <think>\\n\\n</think>\\n\\n
  with enable_thinking=false. <think>, </think>, <tool_call>, </tool_call>, <tool_response>,
  </tool_response> are added tokens that are not special, as in Qwen3.
- gemma2 / gemma3: <bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n...<end_of_turn>\\n,
  roles must alternate (raise_exception otherwise), content trimmed, the system text + "\\n\\n" put in front
  of the first user turn (Gemma 3's template does that; Gemma 2's real template raises on a system message
  instead, and Google's docs tell to put system instructions in the first user turn: gemma2 here does as
  gemma3).
  bos <bos>, eos <eos>, pad <pad>, unk <unk>; BOS added on encode.
- mistral: Mistral-7B-Instruct-v0.3's HF template: <s>[INST] {user}[/INST] {answer|trim}</s>[INST] ...; the
  system message is put in front of the LAST user message, and only when that message is the last of the
  conversation (loop.last): a conversation that ends with an answer has no system text at all; roles must
  alternate. [INST], [/INST] and the tool control tokens are special. Simplified: no tools. No pad; BOS added
  on encode. Model: sliding_window 8 (the real v0.3 has none) so packing crosses a window.
- phi3: Phi-3-mini-instruct: <|system|>\\n..<|end|>\\n<|user|>\\n..<|end|>\\n<|assistant|>\\n..<|end|>\\n,
  generation prompt <|assistant|>\\n, and eos_token (<|endoftext|>) appended at the very end when
  add_generation_prompt is false. As in Phi-3's tokenizer, <|assistant|>, <|end|>, <|user|>, <|system|> and
  the placeholders are rstrip=True: the white space after them (the "\\n", and leading spaces of the content)
  is swallowed by the special token. bos <s> (not added on encode), eos = pad <|endoftext|>, unk <unk>.
- glm4: GLM-4-0414: [gMASK]<sop>, every system message first as <|system|>\\n..., then <|user|>\\n...,
  <|assistant|>\\n..., <|observation|>\\n... with no closing token (the next role token or EOS ends a turn);
  generation prompt <|assistant|>. Simplified: no tools and no tool-call metadata line. eos = pad
  <|endoftext|>, no bos/unk; encoding with special tokens puts [gMASK]<sop> in front, as ChatGLM's tokenizers
  do (get_prefix_tokens; whether GLM-4-0414's tokenizer.json keeps that prefix is not documented).
- zephyr: <|system|>\\n...</s>\\n<|user|>\\n...</s>\\n<|assistant|>\\n...</s>\\n, generation prompt
  <|assistant|>\\n. The role markers are plain text (not tokens), as in zephyr-7b-beta. bos <s>,
  eos = pad </s>, unk <unk>; BOS added on encode (the template itself has none).

The word-level vocabulary is shared: specials of the family first, then white-space runs, ASCII punctuation,
digits, WORDS, and the pieces of every template here (so template literals never map to unk). Text outside it
maps to the unk piece (the family's unk_token, or UNK_PIECE where the family has none): assert_no_unk checks a
rendering. Conversations that tests add must keep to WORDS (or extend it).
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Words and white-space runs are tokens; so are single digits and punctuation marks, and CJK characters
# (two common pairs as one token, as BPE vocabularies hold them). "_" is its own piece: "get_weather" is 3.
SPLIT = r"\s+|[A-Za-z]+|\d|你好|谢谢|[^\sA-Za-z\d]"
_SPLIT_RE = re.compile(SPLIT)

WORDS = """
a about all am an and answer any are as ask asks assistant at be bye can city cloudy cold do does fine for
from get good great have hello help helpful here hi how I in is it know let like London me model my name no
not now of ok okay on one or please question rain reasoning result response say says sunny sure system thank
thanks that the there think this to today tomorrow tool two user warm weather what where which will with yes
you your Paris Hi Hello Thanks OK Ok Yes No The What How It Sure I'm
type function description parameters properties required object string integer number boolean array enum
items name arguments Get
你 好 谢 我 是 的 很 天 气 晴 吗 。 ！ ， ？ 你好 谢谢
"""

# Runs of spaces and newlines that templates and conversations produce ("ok \n", "\n  hi", JSON indents).
WHITESPACE = [
    "".join(p) for n in range(1, 5) for p in itertools.product(" \n", repeat=n)
] + [s for k in range(1, 25) for s in (" " * k, "\n" + " " * k)] + ["\t"]  # fmt: skip


@dataclass(frozen=True)
class Special:
    content: str
    # False: an added token that is still text to the model (Qwen's <think>, <tool_call>)
    special: bool = True
    # True: the token swallows the white space after it (Phi-3's role tokens)
    rstrip: bool = False


@dataclass(frozen=True)
class Family:
    specials: tuple[Special, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None  # the tokenizer's unk_token; families without one still map unknown text to UNK_PIECE
    prefix: tuple[str, ...]  # tokens the tokenizer puts in front of text when add_special_tokens=True
    template: str
    closers: tuple[str, ...]
    generation_eos: tuple[str, ...] | str  # a str where the real generation_config has a single id
    model: Callable[..., PreTrainedModel]  # (vocab_size, {bos,eos,pad}_token_id) -> model
    # a trained Qwen2Tokenizer instead of the word-level toy (see _qwen2_bpe_tokenizer)
    byte_level_bpe: bool = False


UNK_PIECE = "<unk>"  # the word-level model's unknown piece for families whose tokenizer has no unk_token


def _specials(*names: str, special: bool = True, rstrip: bool = False) -> tuple[Special, ...]:
    return tuple(Special(n, special, rstrip) for n in names)


# --- chat templates (written here from the documented layouts; see the module docstring) ---

SMOLLM2_TEMPLATE = """
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    {{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face' -}}
    {{- '<|im_end|>\\n' -}}
  {%- endif -%}
  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

LLAMA3_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\\n\\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\\n\\n"
)

LLAMA3_TEMPLATE = (
    """
{%- set has_tools = tools is defined and tools is not none -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- set system_text = messages[0]['content'] | trim -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_text = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}
{%- if has_tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + (date_string or '26 Jul 2024') + '\\n\\n' -}}
{{- system_text + '<|eot_id|>' -}}
{%- for message in turns -%}
  {%- if has_tools and loop.first -%}
    {#- the tool definitions go into the first user message -#}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' + '"""
    + LLAMA3_TOOLS_INTRO.replace("'", "\\'")
    + """' -}}
    {%- for tool in tools -%}{{- tool | tojson(indent=4) + '\\n\\n' -}}{%- endfor -%}
    {{- message['content'] | trim + '<|eot_id|>' -}}
  {%- elif message.tool_calls -%}
    {%- if message.tool_calls | length != 1 -%}
      {{- raise_exception('This model only supports single tool-calls at once!') -}}
    {%- endif -%}
    {%- set call = message.tool_calls[0].function -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + call.name + '", "parameters": ' -}}
    {{- call.arguments | tojson + '}<|eot_id|>' -}}
  {%- elif message['role'] in ['tool', 'ipython'] -%}
    {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' -}}
    {%- if message.content is mapping or message.content is iterable -%}
      {{- message.content | tojson -}}
    {%- else -%}
      {{- message.content -}}
    {%- endif -%}
    {{- '<|eot_id|>' -}}
  {%- else -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim -}}
    {{- '<|eot_id|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}
"""
)

# The Hermes-style tool preamble Qwen2.5 and Qwen3 put in the system turn (between "# Tools" and </tools>
# come the tool definitions, one JSON per line).
QWEN_TOOLS_HEAD = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
QWEN_TOOLS_TAIL = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call>"
)

# Shared by both Qwen templates: tool results (consecutive ones in one user turn) and tool calls.
QWEN_TOOL_MESSAGE = """
    {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}
      {{- '<|im_start|>user' -}}
    {%- endif -%}
    {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}
      {{- '<|im_end|>\\n' -}}
    {%- endif -%}
"""
QWEN_TOOL_CALLS = """
    {%- for tool_call in message.tool_calls -%}
      {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
      {%- if not loop.first or content -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' -}}
      {{- (call.arguments if call.arguments is string else call.arguments | tojson) + '}\\n</tool_call>' -}}
    {%- endfor -%}
"""

QWEN25_TEMPLATE = (
    """
{%- if messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\\n' + messages[0]['content'] -}}
{%- else -%}
  {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -}}
{%- endif -%}
{%- if tools -%}
  {{- '\\n\\n"""
    + QWEN_TOOLS_HEAD
    + """' -}}
  {%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}
  {{- '"""
    + QWEN_TOOLS_TAIL
    + """' -}}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- for message in messages -%}
  {%- if message['role'] == 'system' and loop.first -%}
  {%- elif message['role'] == 'tool' -%}"""
    + QWEN_TOOL_MESSAGE
    + """
  {%- elif message['role'] == 'assistant' and message.tool_calls -%}
    {%- set content = message['content'] -%}
    {{- '<|im_start|>assistant' + ('\\n' + content if content else '') -}}
    {#- Qwen2.5 puts a newline before every call, the first one included -#}
    {%- for tool_call in message.tool_calls -%}
      {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
      {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + call.arguments | tojson -}}
      {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""
)

QWEN3_TEMPLATE = (
    """
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}
  {{- '"""
    + QWEN_TOOLS_HEAD
    + """' -}}
  {%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}
  {{- '"""
    + QWEN_TOOLS_TAIL
    + """<|im_end|>\\n' -}}
{%- elif messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{#- the last user message that is a query, not tool results wrapped in <tool_response> -#}
{%- set ns = namespace(last_query=messages | length - 1) -%}
{%- for message in messages -%}
  {%- set text = message['content'] if message['content'] is string else '' -%}
  {%- set wrapped = text.startswith('<tool_response>') and text.endswith('</tool_response>') -%}
  {%- if message['role'] == 'user' and not wrapped -%}
    {%- set ns.last_query = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message['content'] if message['content'] is string else '' -%}
  {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- set reasoning = '' -%}
    {%- if message.reasoning_content is string -%}
      {%- set reasoning = message.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}
      {{- content.lstrip('\\n') -}}
    {%- else -%}
      {{- '<|im_start|>assistant\\n' + content -}}
    {%- endif -%}
    {%- if message.tool_calls -%}"""
    + QWEN_TOOL_CALLS
    + """
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
  {%- elif message['role'] == 'tool' -%}"""
    + QWEN_TOOL_MESSAGE
    + """
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\\n\\n</think>\\n\\n' -}}
  {%- endif -%}
{%- endif -%}
"""
)

GEMMA_TEMPLATE = """
{%- if messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
  {{- message['content'] | trim + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""

MISTRAL_TEMPLATE = """
{%- if messages[0]['role'] == 'system' -%}
  {%- set system_text = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('After the optional system message, conversation roles must alternate '
                        'user/assistant/user/assistant/...') -}}
  {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {#- v0.3 puts the system text only in front of a user message that ends the conversation -#}
    {%- if loop.last and system_text is defined -%}
      {{- '[INST] ' + system_text + '\\n\\n' + message['content'] + '[/INST]' -}}
    {%- else -%}
      {{- '[INST] ' + message['content'] + '[/INST]' -}}
    {%- endif -%}
  {%- elif message['role'] == 'assistant' -%}
    {{- ' ' + message['content'] | trim + eos_token -}}
  {%- else -%}
    {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial '
                        'optional system message!') -}}
  {%- endif -%}
{%- endfor -%}
"""

PHI3_TEMPLATE = """
{%- for message in messages -%}
  {%- if message['role'] in ['system', 'user', 'assistant'] -%}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}
"""

GLM4_TEMPLATE = """
{{- '[gMASK]<sop>' -}}
{%- for message in messages if message['role'] == 'system' -%}
  {{- '<|system|>\\n' + message['content'] -}}
{%- endfor -%}
{%- for message in messages if message['role'] in ['user', 'assistant', 'observation'] -%}
  {{- '<|' + message['role'] + '|>\\n' + message['content'] -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
"""

ZEPHYR_TEMPLATE = """
{%- for message in messages -%}
  {%- if message['role'] in ['system', 'user', 'assistant'] -%}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}
  {%- endif -%}
  {%- if loop.last and add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}
{%- endfor -%}
"""


# --- tiny models ---

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
LAYERS = 2
SLIDING_WINDOW = 8  # small, so that tests can pack rows longer than the window


def _shape(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 512,
        **extra,
    }


def _llama(tie: bool, **rope: Any) -> Callable[..., PreTrainedModel]:
    def build(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(
            LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie, **rope, **_shape(), **ids)
        )

    return build


def _qwen2(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **_shape(), **ids)
    return Qwen2ForCausalLM(config)


def _qwen3(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=True, **_shape(), **ids)
    return Qwen3ForCausalLM(config)


def _gemma2(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma 2 alternates sliding and full layers and soft-caps attention (50) and final (30) logits.
    config = Gemma2Config(
        vocab_size=vocab_size, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=HIDDEN // HEADS,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, **_shape(), **ids,
    )  # fmt: skip
    return Gemma2ForCausalLM(config)


def _gemma3(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Gemma 3's 5:1 local:global pattern cut to one of each; sliding layers have their own rope base.
    config = Gemma3TextConfig(
        vocab_size=vocab_size, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=HIDDEN // HEADS,
        layer_types=["sliding_attention", "full_attention"], **_shape(), **ids,
    )  # fmt: skip
    return Gemma3ForCausalLM(config)


def _mistral(sliding_window: int | None) -> Callable[..., PreTrainedModel]:
    def build(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=vocab_size, sliding_window=sliding_window, **_shape(), **ids)
        return MistralForCausalLM(config)

    return build


def _phi3(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi3 has no head_dim argument (hidden / heads) and checks original_max_position_embeddings.
    shape = _shape(original_max_position_embeddings=512)
    del shape["head_dim"]
    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab_size, **shape, **ids))


def _glm4(vocab_size: int, ids: dict[str, int | None]) -> PreTrainedModel:
    from transformers import Glm4Config, Glm4ForCausalLM

    # GLM-4: rotary on half of each head, biased q/k/v (Glm4Config's defaults, kept).
    return Glm4ForCausalLM(Glm4Config(vocab_size=vocab_size, **_shape(), **ids))


# --- the families ---

_PHI3_PLACEHOLDERS = [f"<|placeholder{i}|>" for i in range(1, 7)]

_FAMILY: dict[str, Family] = {
    "smollm2": Family(
        specials=_specials("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>", prefix=(),
        template=SMOLLM2_TEMPLATE, closers=("<|im_end|>",), generation_eos="<|im_end|>",
        model=_llama(tie=True),
    ),
    "llama3": Family(
        specials=_specials(
            "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
        ),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, prefix=("<|begin_of_text|>",),
        template=LLAMA3_TEMPLATE, closers=("<|eot_id|>",),
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        model=_llama(
            tie=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
            },
        ),
    ),
    "qwen2.5": Family(
        specials=_specials("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        + _specials("<tool_call>", "</tool_call>", special=False),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, prefix=(),
        template=QWEN25_TEMPLATE, closers=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
        model=_qwen2, byte_level_bpe=True,
    ),
    "qwen3": Family(
        specials=_specials("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        + _specials(
            "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
            special=False,
        ),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, prefix=(),
        template=QWEN3_TEMPLATE, closers=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
        model=_qwen3,
    ),
    "gemma2": Family(
        specials=_specials("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", prefix=("<bos>",),
        template=GEMMA_TEMPLATE, closers=("<end_of_turn>",), generation_eos=("<eos>", "<end_of_turn>"),
        model=_gemma2,
    ),
    "gemma3": Family(
        specials=_specials("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", prefix=("<bos>",),
        template=GEMMA_TEMPLATE, closers=("<end_of_turn>",), generation_eos=("<eos>", "<end_of_turn>"),
        model=_gemma3,
    ),
    "mistral": Family(
        specials=_specials(
            "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
        ),
        bos="<s>", eos="</s>", pad=None, unk="<unk>", prefix=("<s>",),
        template=MISTRAL_TEMPLATE, closers=("</s>",), generation_eos="</s>",
        model=_mistral(SLIDING_WINDOW),
    ),
    "phi3": Family(
        specials=_specials("<unk>", "<s>")
        + _specials("</s>", rstrip=True)
        + _specials("<|endoftext|>")
        + _specials("<|assistant|>", *_PHI3_PLACEHOLDERS[:4], "<|system|>", "<|end|>", rstrip=True)
        + _specials(*_PHI3_PLACEHOLDERS[4:], "<|user|>", rstrip=True),
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", prefix=(),
        template=PHI3_TEMPLATE, closers=("<|end|>",),
        generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"),
        model=_phi3,
    ),
    "glm4": Family(
        specials=_specials(
            "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>",
        ),
        bos=None, eos="<|endoftext|>", pad="<|endoftext|>", unk=None, prefix=("[gMASK]", "<sop>"),
        template=GLM4_TEMPLATE,
        closers=("<|user|>", "<|observation|>", "<|assistant|>", "<|endoftext|>"),  # the next role, or EOS
        generation_eos=("<|endoftext|>", "<|user|>", "<|observation|>"),
        model=_glm4,
    ),
    "zephyr": Family(
        specials=_specials("<unk>", "<s>", "</s>"),
        bos="<s>", eos="</s>", pad="</s>", unk="<unk>", prefix=("<s>",),
        template=ZEPHYR_TEMPLATE, closers=("</s>",), generation_eos="</s>",
        model=_mistral(4096),  # zephyr-7b-beta's base (Mistral-7B-v0.1) has a 4096 window
    ),
}  # fmt: skip

FAMILIES: list[str] = list(_FAMILY)
CLOSERS: dict[str, tuple[str, ...]] = {name: f.closers for name, f in _FAMILY.items()}
GENERATION_EOS: dict[str, tuple[str, ...] | str] = {name: f.generation_eos for name, f in _FAMILY.items()}
TOOL_FAMILIES: list[str] = ["llama3", "qwen2.5", "qwen3"]  # templates that render `tools` and `tool_calls`


def family(name: str) -> Family:
    if name not in _FAMILY:
        raise KeyError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}")
    return _FAMILY[name]


# --- sample conversations every family renders (user/assistant alternate after an optional system) ---


def _chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


SAMPLE_CONVERSATIONS: list[list[dict[str, Any]]] = [
    _chat(("user", "hi"), ("assistant", "hello there")),
    _chat(
        ("system", "you are a helpful assistant."),
        ("user", "how are you?"),
        ("assistant", "fine, thanks!"),
        ("user", "what is the weather in Paris?"),
        ("assistant", "sunny in Paris."),
    ),
    _chat(("user", "say ok"), ("assistant", "ok \n")),  # an answer that ends in white space
    _chat(("user", "  hello"), ("assistant", "  hi there")),  # leading spaces
    _chat(("user", "你好"), ("assistant", "你好！谢谢。")),
]

SAMPLE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city"}},
                "required": ["city"],
            },
        },
    }
]

# OpenAI-style tool use, for TOOL_FAMILIES (pass tools=SAMPLE_TOOLS).
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "what is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "name": "get_weather", "content": "sunny"},
    {"role": "assistant", "content": "sunny in Paris."},
]

# Qwen3's reasoning: a think block on the answer to the last query.
REASONING_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine, thanks!", "reasoning_content": "the user asks how I am."},
]


# --- vocabulary and tokenizers ---


def pieces(text: str) -> list[str]:
    """text split as the tokenizers' pre-tokenizer splits it (added tokens aside)."""
    return _SPLIT_RE.findall(text)


def _template_pieces() -> list[str]:
    # The templates' string literals are written with \\n escapes; read them as the newlines they render.
    sources = [f.template.replace("\\n", "\n") for f in _FAMILY.values()]
    return [p for src in sources for p in pieces(src) if not p.isspace()]


def shared_words() -> list[str]:
    """The vocabulary every family shares (after its own specials), in a fixed order."""
    words = [*WHITESPACE, *string.punctuation, *string.digits, *WORDS.split(), *_template_pieces()]
    return list(dict.fromkeys(words))


def _word_vocab(name: str) -> dict[str, int]:
    f = family(name)
    tokens = [s.content for s in f.specials]
    if f.unk is None:
        tokens.append(UNK_PIECE)
    tokens += [w for w in shared_words() if w not in tokens]
    return {tok: i for i, tok in enumerate(tokens)}


def _add_specials(tok: PreTrainedTokenizerFast, f: Family) -> None:
    added = [AddedToken(s.content, special=s.special, rstrip=s.rstrip, normalized=False) for s in f.specials]
    tok.add_special_tokens({"extra_special_tokens": [a for a in added if a.special]})
    tok.add_tokens([a for a in added if not a.special])
    tok.chat_template = f.template.strip()


def _word_level_tokenizer(name: str) -> PreTrainedTokenizerFast:
    f = family(name)
    model = Tokenizer(models.WordLevel(_word_vocab(name), unk_token=f.unk or UNK_PIECE))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    model.decoder = decoders.Fuse()  # tokens are pieces of the text: decoding concatenates them
    if f.prefix:
        prefix = " ".join(f.prefix)
        specials = [(t, model.token_to_id(t)) for t in dict.fromkeys(f.prefix)]
        model.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A", pair=f"{prefix} $A $B:1", special_tokens=specials
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=f.bos, eos_token=f.eos, pad_token=f.pad, unk_token=f.unk
    )
    _add_specials(tok, f)
    return tok


def _qwen2_bpe_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A Qwen2Tokenizer (byte-level BPE) trained here on the shared words and this family's renderings of the
    sample conversations, so that they are mostly whole tokens.

    Why not word-level like the others: for a model of type "qwen2", transformers 5 AutoTokenizer ignores the
    saved tokenizer class and rebuilds a Qwen2Tokenizer from tokenizer.json's vocab and merges (qwen2 is in
    MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), dropping a word-level model's pre-tokenizer: a saved toy would
    load back as a different tokenizer. A Qwen2Tokenizer round-trips exactly."""
    from tokenizers import normalizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    f = family(name)
    renderer = _word_level_tokenizer(name)  # only to render the training text with this family's template
    texts = [renderer.apply_chat_template(conv, tokenize=False) for conv in SAMPLE_CONVERSATIONS]
    texts.append(renderer.apply_chat_template(TOOL_CONVERSATION, tools=SAMPLE_TOOLS, tokenize=False))
    for s in f.specials:  # added tokens are matched before the model: keep them out of its training text
        texts = [t.replace(s.content, "\n") for t in texts]
    corpus = [*shared_words(), *(" " + w for w in WORDS.split()), *texts]

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no limit: merge until every pre-token of the corpus is one token
        special_tokens=[s.content for s in f.specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)  # deterministic: ties are broken by the pair, not hash order
    trained = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], unk_token=f.unk,
        bos_token=f.bos, eos_token=f.eos, pad_token=f.pad,
    )  # fmt: skip
    _add_specials(tok, f)
    return tok


def make_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer: its special tokens, bos/eos/pad/unk, prefix tokens and chat template."""
    if family(name).byte_level_bpe:
        return _qwen2_bpe_tokenizer(name)
    return _word_level_tokenizer(name)


def unk_id(tokenizer: PreTrainedTokenizerFast) -> int | None:
    """The id unknown text maps to (the unk_token, or the word-level model's own unk piece); None for a
    byte-level BPE, where no text is unknown."""
    model = tokenizer.backend_tokenizer.model
    unk = getattr(model, "unk_token", None)
    return None if unk is None else model.token_to_id(unk)


def assert_no_unk(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """text's ids (no special tokens added); fails naming the pieces the vocabulary lacks."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    unk = unk_id(tokenizer)
    spans = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    unknown = [text[s:e] for i, (s, e) in spans if unk is not None and i == unk]
    assert not unknown, f"pieces outside the vocabulary: {unknown!r} in {text!r}"
    return list(enc["input_ids"])


def token_ids(tokenizer: PreTrainedTokenizerFast, tokens: str | tuple[str, ...]) -> int | list[int]:
    if isinstance(tokens, str):
        return tokenizer.convert_tokens_to_ids(tokens)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def tiny_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A small random model of the family's architecture sized for its tokenizer: the same weights for the
    same family and seed. bos/eos/pad ids come from the tokenizer; generation_config.eos_token_id is the
    family's real stop list (or single id)."""
    import torch
    from transformers import GenerationConfig

    f = family(name)
    tok = make_tokenizer(name)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    with torch.random.fork_rng():  # seeded without moving the caller's random state
        torch.manual_seed(seed)
        model = f.model(len(tok), ids)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=token_ids(tok, f.generation_eos),
        pad_token_id=tok.pad_token_id,
    )
    return model


def save_family(name: str, folder: str | Path, seed: int = 0) -> Path:
    """tiny_model and make_tokenizer of the family saved in folder (returned), for the Auto classes."""
    folder = Path(folder)
    tiny_model(name, seed).save_pretrained(folder)
    make_tokenizer(name).save_pretrained(folder)
    return folder
