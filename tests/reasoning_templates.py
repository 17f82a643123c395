"""Chat templates that render the history differently from the turn being generated, written here from each
documented layout, on a word-level toy tokenizer (tests/toy.py's, plus <think>/</think>, [INST]/[/INST] and a few
words) whose ids can be read off `ids`.

- QWEN3: ChatML; an assistant turn after the last user turn is rendered <think>\\n{reasoning}\\n</think>\\n\\n
  {content} when it has reasoning or is the last message (the final answer gets an empty think block), any other
  without its reasoning; native tools (a <tool_call> line per call after the text, results in a tool turn);
  enable_thinking false puts the empty think block in the generation prompt.
- DEEPSEEK_R1: {system}<|user|>{q}<|assistant|>{answer}</s>; the reasoning is dropped from every answer but the
  last message, which is <think>\\n{reasoning}\\n</think>\\n\\n{answer}; the generation prompt opens the block
  (<|assistant|><think>\\n).
- MISTRAL: <s>[INST] {q}[/INST] {answer}</s>...; the system text goes in front of the last user turn.
- MISTRAL_V03: as MISTRAL, but the system text goes only in front of a user turn that ends the conversation
  (Mistral-7B-Instruct-v0.3's HF template): no rendering holds the system text and an answer to it.
- CHATML: tests/toy.py's stable ChatML, which has no place for reasoning.
- CHATML_THINK: stable ChatML that keeps every answer's reasoning (a think block where there is reasoning).
<think> and </think> are added tokens that are not special, as in Qwen3; [INST] and [/INST] are special.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from toy import CHATML, SPECIALS, vocab
from transformers import PreTrainedTokenizerFast

EXTRA_WORDS = ["in", "is", "it", "the", "so", "say", "asks", "greet", "back", "think", "tool_call"]
THINK = ["<think>", "</think>"]
MISTRAL_SPECIALS = ["[INST]", "[/INST]"]

QWEN3 = """
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- for tool in tools -%}{{- tool.function.name -}}{%- endfor -%}
  {{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}
    {%- endif -%}
    {{- m.content -}}
    {%- if m.tool_calls -%}
      {%- for call in m.tool_calls -%}
        {{- '\\n<tool_call>' + call.function.name + ' ' + call.function.arguments | tojson + '</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""

DEEPSEEK_R1 = """
{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {{- '<|user|>' + m.content -}}
  {%- elif m.role == 'assistant' -%}
    {{- '<|assistant|>' -}}
    {%- if loop.last -%}
      {{- '<think>\\n' + (m.reasoning_content if m.reasoning_content is string else '') + '\\n</think>\\n\\n' -}}
    {%- endif -%}
    {{- m.content + '</s>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|><think>\\n' -}}{%- endif -%}
"""

_MISTRAL = """
{%- if messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{{- bos_token -}}
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {%- if system and WHERE -%}
      {{- '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' -}}
    {%- else -%}
      {{- '[INST] ' + m.content + '[/INST]' -}}
    {%- endif -%}
  {%- elif m.role == 'assistant' -%}
    {{- ' ' + m.content | trim + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""
MISTRAL = _MISTRAL.replace("WHERE", "loop.index0 == ns.last_user")
MISTRAL_V03 = _MISTRAL.replace("WHERE", "loop.last")

CHATML_THINK = """
{%- for m in messages -%}
  {{- '<|im_start|>' + m.role + '\\n' -}}
  {%- if m.reasoning_content -%}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' -}}{%- endif -%}
  {{- m.content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

TEMPLATES = {
    "qwen3": QWEN3,
    "deepseek_r1": DEEPSEEK_R1,
    "mistral": MISTRAL,
    "mistral_v03": MISTRAL_V03,
    "chatml": CHATML,
    "chatml_think": CHATML_THINK,
}
# the layouts that render a turn differently once later turns follow
REWRITING = ("qwen3", "deepseek_r1", "mistral", "mistral_v03")
# the layouts that render reasoning (chatml has no place for it)
REASONING = ("qwen3", "deepseek_r1", "chatml_think")


def reasoning_vocab() -> dict[str, int]:
    """tests/toy.py's vocabulary (the same ids), then EXTRA_WORDS; the added tokens come after them."""
    words = vocab()
    for word in EXTRA_WORDS:
        words.setdefault(word, len(words))
    return words


def make_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The toy tokenizer with TEMPLATES[name]; eos <|im_end|> for the ChatML layouts, </s> for the others."""
    template = TEMPLATES[name]
    tok = Tokenizer(models.WordLevel(reasoning_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    eos = "<|im_end|>" if name.startswith(("qwen3", "chatml")) else "</s>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=eos, pad_token=eos
    )
    specials = [t for t in SPECIALS if t not in ("<unk>", "<s>", eos)] + MISTRAL_SPECIALS
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.add_tokens(THINK)  # not special: text to the model, as in Qwen3
    fast.chat_template = template
    return fast


def token_ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    found = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert tokenizer.unk_token_id not in found or "<unk>" in tokens, tokens
    return found
