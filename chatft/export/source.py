"""What an export starts from, loaded the way inference loads it: every call into chatft.inference is here.

A source is a model folder (a base model, or a full fine-tune with its run_args.json) or a LoRA/QLoRA adapter,
which is merged into its base loaded in float32 (a QLoRA adapter too: never into a 4-bit base). Its tokenizer,
chat template, prompt style and stop tokens are the ones inference would use for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatft.data.schema import Conversation
from chatft.data.templates import Template
from chatft.export.gguf import ExportError, gguf_architecture
from chatft.inference.common import InferError
from chatft.inference.generation import GenerationOptions, generate, render_prompt
from chatft.inference.loading import (
    ADAPTER_CONFIG,
    Session,
    choose_template,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
    stop_token_ids,
    trained_on_raw,
)


@dataclass
class Source:
    kind: str  # base, full or lora
    path: str
    base: str  # the model folder (the source itself unless it is an adapter)
    model: Any
    tokenizer: Any
    template: Template | None  # None: raw prompts only (no chat template)
    raw: bool  # trained on input-output data: prompts are raw text
    stop_ids: list[int]
    run_args: dict

    @property
    def chat_template(self) -> Any:
        """The chat template the model was trained with (a native one, or the tokenizer's own)."""
        if self.template is not None and self.template.chat_template:
            return self.template.chat_template
        return getattr(self.tokenizer, "chat_template", None)


def ptuning_refusal(path: str) -> str:
    return (
        f"{path} is a P-Tuning v2 checkpoint: a prefix has no GGUF form (it is extra key/values fed to every "
        "layer, not weights llama.cpp can hold); run it with `python inference.py --pt-checkpoint "
        f"{path}`, or train a LoRA (--method lora) to export"
    )


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def check_source(path: str, base: str | None) -> tuple[str, str | None]:
    """(kind, the base folder for an adapter), refusing what cannot be exported before anything is loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{path}: no such folder")
    if (folder / ADAPTER_CONFIG).is_file():
        config = _json(folder / ADAPTER_CONFIG)
        peft_type = config.get("peft_type")
        if peft_type == "PREFIX_TUNING":
            raise ExportError(ptuning_refusal(path))
        if peft_type != "LORA":
            raise ExportError(
                f"{path}: a peft checkpoint of type {peft_type!r}; only LoRA/QLoRA adapters export"
            )
        base = base or config.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            where = f"its base {base} is not here" if base else "it names no base model"
            raise ExportError(f"{path} is a LoRA adapter and {where}; give the base model folder with --base")
        model_folder = base
        kind = "lora"
    elif (folder / "config.json").is_file():
        if base:
            raise ExportError(f"--base is for adapters; {path} is a whole model")
        model_folder, kind = path, "model"
    else:
        raise ExportError(f"{path}: not a model folder or adapter (no config.json, no {ADAPTER_CONFIG})")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{model_folder}: cannot read its config ({e})") from e
    try:
        gguf_architecture(config)
    except ExportError as e:
        raise ExportError(f"{model_folder}: {e}") from e
    return kind, base if kind == "lora" else None


def load_source(path: str, base: str | None = None, say: Callable[[str], Any] = print) -> Source:
    import torch

    kind, base = check_source(path, base)
    try:
        if kind == "lora":
            ckpt = resolve_checkpoint(base, adapter=path, say=say)
        else:
            ckpt = resolve_checkpoint(path, say=say)
        tokenizer = load_tokenizer(ckpt.tokenizer_path)
        template = choose_template(None, ckpt.run_args, tokenizer)
        raw = template is None or trained_on_raw(ckpt.run_args)
        bits = (ckpt.run_args.get("model") or {}).get("quantization_bit")
        if bits:
            say(f"note: trained on a {bits}-bit base; merged into the float32 base {ckpt.model_path}")
        model = load_model(ckpt, torch.float32, "cpu")
    except InferError as e:
        raise ExportError(str(e)) from e
    if ckpt.adapter_path:
        model = model.merge_and_unload()
    model.eval()
    return Source(
        ckpt.kind,
        path,
        ckpt.model_path,
        model,
        tokenizer,
        template,
        raw,
        stop_token_ids(tokenizer, template, model.generation_config, ckpt.run_args),  # as inference stops
        ckpt.run_args,
    )


def session_for(
    model: Any, tokenizer: Any, template: Template | None, raw: bool, stop_ids: list[int]
) -> Session:
    return Session(model, tokenizer, template, raw, stop_ids, "cpu")


def prompt(session: Session, conv: Conversation) -> tuple[str, list[int]]:
    """The text and ids inference would feed the model for conv (which ends where the model answers)."""
    return render_prompt(session, conv)


def greedy(session: Session, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """chatft's greedy answers (new ids, cut before the first stop token), the prompts in one left-padded batch."""
    return generate(session, prompts, GenerationOptions(max_new_tokens))
