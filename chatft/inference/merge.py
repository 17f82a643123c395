"""scripts/merge_adapter.py: merge a LoRA adapter into its base and save a standalone model folder."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from chatft.args import RUN_ARGS_FILE
from chatft.data.templates import TemplateError
from chatft.inference.common import InferError, to_stderr
from chatft.inference.loading import (
    choose_template,
    load_model,
    load_tokenizer,
    read_adapter_config,
    resolve_checkpoint,
    stop_token_ids,
)


def merge_main(argv: Sequence[str] | None = None) -> int:
    """scripts/merge_adapter.py BASE ADAPTER OUT."""
    p = argparse.ArgumentParser(
        prog="merge_adapter.py",
        description=textwrap.dedent(
            """\
            Merge a LoRA adapter into its base and write a standalone model folder (safetensors, tokenizer, chat
            template, generation config, run_args.json). P-Tuning v2 checkpoints have nothing to merge."""
        ),
    )
    p.add_argument("base", help="the base model folder the adapter was trained on")
    p.add_argument("adapter", help="the LoRA adapter folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved dtype"
    )
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    args = p.parse_args(argv)
    try:
        merge_adapter(args.base, args.adapter, args.out, args.dtype, args.overwrite)
    except (InferError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def merge_adapter(base: str, adapter: str, out: str, dtype: str = "float32", overwrite: bool = False) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = read_adapter_config(adapter, "ADAPTER")
    if config.get("peft_type") == "PREFIX_TUNING":
        raise InferError(
            f"{adapter} is a P-Tuning v2 checkpoint: there is nothing to merge (prefix tuning adds key/value "
            f"prefixes to every layer, not weight deltas); use it as it is: inference.py --pt-checkpoint {adapter}"
        )
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise InferError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    ckpt = resolve_checkpoint(base, adapter=adapter)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    saved_padding_side = tokenizer.init_kwargs.get("padding_side", "right")
    template = choose_template(None, ckpt.run_args, tokenizer)
    model = load_model(ckpt, getattr(torch, dtype), "cpu").merge_and_unload()
    model.config.use_cache = True
    generation = model.generation_config
    # the model's own list, and every end of turn training trained: the merged folder stops on its own
    generation.eos_token_id = stop_token_ids(tokenizer, template, generation, ckpt.run_args)
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    if template is not None and template.chat_template:
        tokenizer.chat_template = template.chat_template  # a native template becomes the folder's own
    tokenizer.padding_side = saved_padding_side  # as it was; inference sets left itself
    tokenizer.save_pretrained(out)
    run_args = dict(ckpt.run_args)
    run_args["merged"] = {"base": base, "adapter": adapter}
    (Path(out) / RUN_ARGS_FILE).write_text(
        json.dumps(run_args, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    to_stderr(f"merged {adapter} into {base}: {out}")
