"""scripts/export_gguf.py: a model folder, a LoRA/QLoRA adapter or a base model as a verified GGUF, with an Ollama
Modelfile beside it.

The GGUF is written as OUT.gguf.partial, checked (chatft.export.verify) and only then renamed to OUT.gguf; a
file that fails its check is left as OUT.gguf.unverified and the export exits with status 1. Bad input (a
P-Tuning checkpoint, an unsupported architecture, an adapter without its base, ...) is one `error:` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatft.data.schema import Conversation
from chatft.data.templates import TemplateError, render_generation_prompt, render_with_spans
from chatft.export import modelfile as mf
from chatft.export.gguf import FILE_TYPES, ExportError, Tokens, write_gguf
from chatft.export.source import Source, check_source, load_source
from chatft.export.verify import VerifyError, sample_conversations, verify

EXAMPLES = """\
examples:
  python scripts/export_gguf.py output/rz/lora output/rz/rz.gguf               # a LoRA adapter, merged into its base
  python scripts/export_gguf.py models/SmolLM2-135M-Instruct smol.gguf --type q8_0
  python scripts/export_gguf.py output/qlora out.gguf --base models/SmolLM2-135M-Instruct
then: ollama create rz -f output/rz/rz.Modelfile    or    llama-cli -m output/rz/rz.gguf --jinja -cnv
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_gguf.py",
        description="Export a model folder, a LoRA/QLoRA adapter (merged into its float32 base) or a base model to "
        "GGUF for llama.cpp, Ollama and LM Studio, with its tokenizer, chat template and stop tokens, and an "
        "Ollama Modelfile beside it. The file is loaded back and checked before the export reports success.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("source", help="model folder, LoRA/QLoRA adapter folder, or base model folder")
    p.add_argument("out", help="the .gguf file to write (the Modelfile goes beside it as <name>.Modelfile)")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES), help="weight type (default: f16)")
    p.add_argument(
        "--base", help="an adapter's base model folder (default: the one its adapter_config.json names)"
    )
    p.add_argument("--name", help="general.name in the file (default: from the folder names)")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false", help="write no Ollama Modelfile")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--verify_prompts", type=int, default=4, help="greedy prompts compared (default: 4)")
    p.add_argument("--verify_tokens", type=int, default=32, help="tokens per greedy answer (default: 32)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        export(args)
    except (ExportError, mf.ModelfileError, TemplateError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerifyError as e:
        print(f"error: verification failed: {e}", file=sys.stderr)
        return 1
    return 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(args: argparse.Namespace, log: Callable[[str], Any] = say) -> Path:
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output file must end in .gguf")
    if out.exists() and not args.overwrite:
        raise ExportError(f"{out} exists; choose another name or pass --overwrite")
    if args.verify_prompts < 1 or args.verify_tokens < 1:
        raise ExportError("--verify_prompts and --verify_tokens must be at least 1")
    check_source(args.source, args.base)  # refusals come before anything is loaded
    start = time.perf_counter()
    source = load_source(args.source, args.base, say=log)
    if source.kind == "lora":
        log(f"merged the LoRA adapter {args.source} into its float32 base {source.base}")
    conversations = sample_conversations(training_sample(source.run_args))
    modelfile = None
    if args.modelfile:
        modelfile = plan_modelfile(source, out, conversations)  # refused before the big file is written
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    tokens = Tokens(source.chat_template, source.stop_ids, adds_bos(source.tokenizer))
    written = write_gguf(
        partial, source.model, source.tokenizer, tokens, args.type, metadata(source, args.name)
    )
    size = partial.stat().st_size
    log(f"wrote {partial} ({size / 1e6:.1f} MB, {len(written.tensors)} weights, {args.type}); verifying ...")
    try:
        report = verify(
            partial, source, written, args.type, conversations, args.verify_prompts, args.verify_tokens
        )
    except VerifyError:
        failed = out.with_name(out.name + ".unverified")
        os.replace(partial, failed)
        log(f"the unverified file is left as {failed}")
        raise
    os.replace(partial, out)
    print(
        f"exported {args.source} -> {out} ({args.type}, {size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s"
    )
    print(f"  tokenizer: byte-level BPE, pre-tokenizer {written.pre_tokenizer}, {len(source.tokenizer)} tokens, "
          f"{written.n_merges} merges; chat template: {template_name(source)}")  # fmt: skip
    print("verified:")
    for line in report.lines:
        print(f"  {line}")
    if modelfile is not None:
        path, text, note = modelfile
        path.write_text(text, encoding="utf-8")
        print(f"Modelfile: {path} ({note}); ollama create {out.stem} -f {path}")
    return out


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS before a text of its own accord (llama.cpp's add_bos_token)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bos is not None
        and with_special[:1] == [bos]
        and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    )


def template_name(source: Source) -> str:
    if source.template is None:
        return "none (raw prompts)"
    own = "the tokenizer's own" if not source.template.chat_template else source.template.name
    return own + (", the one the run trained with" if source.run_args else "")


def training_sample(run_args: dict, count: int = 8, max_bytes: int = 20_000_000) -> list[Conversation]:
    """Up to count chat records of the run's own training files, when they are still there (and not huge)."""
    from chatft.data.formats import DataFileError, load_conversations

    data = run_args.get("data") or {}
    files = [
        f for f in data.get("train_file") or [] if Path(f).is_file() and Path(f).stat().st_size < max_bytes
    ]
    if not files:
        return []
    try:
        loaded = load_conversations(files[:1], data.get("train_format") or "auto", log=lambda _: None)
    except (DataFileError, ValueError, OSError):
        return []
    chats = [conv for _, _, conv in loaded.records if not conv.raw and not conv.tools]
    chats = [
        c for c in chats if any(m.role == "user" for m in c.messages) and c.messages[0].role != "assistant"
    ]
    return chats[:count]


def metadata(source: Source, name: str | None) -> dict[str, Any]:
    """general.* (name, description, base model) and chatft.* (the training run's basic facts)."""
    model_args = source.run_args.get("model") or {}
    data_args = source.run_args.get("data") or {}
    training = source.run_args.get("training") or {}
    trained_on = model_args.get("model_name_or_path") or source.base  # a full fine-tune's own base
    base_name = Path(str(trained_on)).name
    if name is None:  # the folder's name; an adapter's after its base's
        own = Path(source.path).resolve().name
        name = f"{Path(source.base).name}-{own}" if source.kind == "lora" else own
    method = model_args.get("method") or ("lora" if source.kind == "lora" else None)
    files = [str(f) for f in data_args.get("train_file") or []]
    facts: dict[str, Any] = {
        "general.name": name,
        "chatft.source": str(source.path),
        "chatft.kind": source.kind,
    }
    if source.kind != "base":
        facts["general.description"] = f"chatft {method or source.kind} fine-tune of {base_name}" + (
            f" on {', '.join(Path(f).name for f in files)}" if files else ""
        )
        facts |= {
            "chatft.base_model": str(trained_on),
            "chatft.method": method,
            "chatft.template": model_args.get("template") or "tokenizer",
            "chatft.train_files": files or None,
            "chatft.max_steps": training.get("max_steps") if (training.get("max_steps") or -1) > 0 else None,
            "chatft.num_train_epochs": None
            if (training.get("max_steps") or -1) > 0
            else training.get("num_train_epochs"),
            "chatft.learning_rate": training.get("learning_rate"),
            "chatft.lora_rank": model_args.get("lora_rank") if method in ("lora", "qlora") else None,
            "chatft.quantization_bit": model_args.get("quantization_bit"),
            "chatft.run_args": json.dumps(source.run_args, ensure_ascii=False, default=str)
            if source.run_args
            else None,
        }
    return facts


def renderer_for(source: Source) -> mf.Renderer:
    def render(conv: Conversation, generation_prompt: bool) -> str:
        if generation_prompt:
            return render_generation_prompt(conv, source.tokenizer, source.template)
        return render_with_spans(conv, source.tokenizer, source.template)[0]

    return render


def plan_modelfile(source: Source, out: Path, conversations: list[Conversation]) -> tuple[Path, str, str]:
    """(where, the Modelfile's text, a note), or ModelfileError when the chat template cannot be translated."""
    path = out.with_name(out.stem + ".Modelfile")
    stops = source.tokenizer.convert_ids_to_tokens(source.stop_ids)
    comments = [f"Ollama Modelfile written by chatft's export_gguf.py: ollama create NAME -f {path.name}"]
    if source.raw:
        comments.append("The model was trained on raw prompts (input-output data): no chat markup.")
        return path, mf.modelfile_text(out, mf.RAW_TEMPLATE, stops, comments), "raw prompts"
    bos = source.tokenizer.bos_token if adds_bos(source.tokenizer) else None
    try:
        template, n, notes = mf.translate(renderer_for(source), conversations, bos)
    except mf.ModelfileError as e:
        raise mf.ModelfileError(f"no Modelfile: {e}; export the GGUF alone with --no-modelfile (it carries the chat "
                                "template for llama.cpp's --jinja)") from e  # fmt: skip
    comments.append(
        f"TEMPLATE: the chat template the model was trained with ({template_name(source)}) in Ollama's syntax; it "
        f"rendered the same text as that template for {n} conversations when this file was written."
    )
    comments += notes
    return path, mf.modelfile_text(out, template, stops, comments), f"template checked on {n} conversations"
