#!/usr/bin/env python
"""Write a model folder that is the default model (SmolLM2-135M-Instruct) with a hybrid-reasoning chat template.

SmolLM2's own template is plain ChatML with a default system prompt: it has no place for reasoning, so chatft
refuses reasoning data with it. This writes OUT with the same weights (a symbolic link to the source's
model.safetensors, not a copy), copies of its config, generation config and tokenizer files, and a
chat_template.jinja written in this project in Qwen3's documented layout:

- SmolLM2's default system prompt when the conversation has no system message (as its own template does);
- the answers after the last user turn are written <think>\\n{reasoning}\\n</think>\\n\\n{answer}, the last one
  always (an empty think block when it has no reasoning), an earlier one only when it has reasoning; answers
  before the last user turn lose their reasoning;
- the generation prompt is <|im_start|>assistant\\n; with enable_thinking false (--chat_template_kwargs
  '{"enable_thinking": false}') it also holds the empty think block, so the model answers without reasoning.

What it does not do: <think> and </think> are not added to the vocabulary (no embedding is resized); the byte-level
tokenizer writes them as ordinary text pieces, which the model learns like any other text and inference splits
on as text. The weights are SmolLM2's unchanged: the base model has never seen a think block.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "models" / "SmolLM2-135M-Instruct"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

HYBRID_REASONING_TEMPLATE = (
    """\
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if messages[0].role != 'system' -%}
  {{- '<|im_start|>system\\nSYSTEM<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set content = m.content if m.content is string else '' -%}
  {%- if m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}
    {%- endif -%}
    {{- content + '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""
).replace("SYSTEM", SYSTEM)

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHTS = "model.safetensors"


def make_reasoning_model(source: Path, out: Path) -> Path:
    missing = [name for name in (*COPIED, WEIGHTS) if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source}: no {', '.join(missing)} (run `bash scripts/get_demo_model.sh` for the default model)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(source / name, out / name)
    link = out / WEIGHTS
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink((source / WEIGHTS).resolve(), link)
    (out / "chat_template.jinja").write_text(HYBRID_REASONING_TEMPLATE, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="the model folder (default: %(default)s)")
    p.add_argument("--out", required=True, help="the folder to write (its files are replaced)")
    args = p.parse_args(argv)
    try:
        out = make_reasoning_model(Path(args.source), Path(args.out))
    except (OSError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {Path(args.source).name}'s weights (linked) with a hybrid-reasoning chat template")
    return 0


if __name__ == "__main__":
    sys.exit(main())
