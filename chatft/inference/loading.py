"""Load a model from the arguments alone (a base or full fine-tuned folder, a P-Tuning v2 checkpoint, a LoRA /
QLoRA adapter) into a Session: model, tokenizer, template, prompt style and stop tokens.

A checkpoint's base defaults to its adapter_config.json's base_model_name_or_path, its tokenizer to the one saved
beside it, its chat template to the one it was trained with (run_args.json's model.template) and its prompt style
to raw text when it was trained on input-output data. A P-Tuning checkpoint's number of prefix tokens and
prefix_projection come from its adapter_config.json (a projected prefix is saved as the projection's output, so no
MLP is needed at inference).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.args import RUN_ARGS_FILE
from chatft.data.formats import DataFileError, detect_format, expand_paths
from chatft.data.templates import Template, closing_token_ids, get_template
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.inference.common import InferError, one_line, to_stderr
from chatft.threads import ThreadGovernor, this_process_budget

ADAPTER_CONFIG = "adapter_config.json"


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


PEFT_KINDS = {"PREFIX_TUNING": "ptuning", "LORA": "lora"}


ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class Checkpoint:
    """What to load. kind: base (a model folder with no run_args.json), full, ptuning or lora."""

    kind: str
    model_path: str
    adapter_path: str | None
    tokenizer_path: str
    run_args: dict
    adapter_config: dict = field(default_factory=dict)


def read_adapter_config(path: str, flag: str) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise InferError(f"{flag} {path}: no such folder")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        hint = " (it holds a whole model: load it with --model)" if (folder / "config.json").is_file() else ""
        raise InferError(f"{flag} {path}: not a peft checkpoint, no {ADAPTER_CONFIG}{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InferError(f"{flag} {path}: unreadable {ADAPTER_CONFIG} ({one_line(e)})") from e
    if not isinstance(config, dict):
        raise InferError(f"{flag} {path}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def read_run_args(folder: str | None) -> dict:
    """run_args.json of a training output or checkpoint folder; {} when there is none (a plain model)."""
    if folder is None or not (Path(folder) / RUN_ARGS_FILE).is_file():
        return {}
    try:
        data = json.loads((Path(folder) / RUN_ARGS_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InferError(f"{folder}/{RUN_ARGS_FILE}: unreadable ({one_line(e)})") from e
    return data if isinstance(data, dict) else {}


def resolve_checkpoint(
    model: str | None,
    pt_checkpoint: str | None = None,
    adapter: str | None = None,
    tokenizer: str | None = None,
    pre_seq_len: int | None = None,
    say: Callable[[str], Any] = to_stderr,
) -> Checkpoint:
    """Which folders hold the base, the adapter and the tokenizer; checks the checkpoint is of the kind asked."""
    adapter_path, flag = (pt_checkpoint, "--pt-checkpoint") if pt_checkpoint else (adapter, "--adapter")
    config: dict = {}
    if adapter_path:
        config = read_adapter_config(adapter_path, flag)
        kind = PEFT_KINDS.get(config.get("peft_type"))
        wanted = "ptuning" if pt_checkpoint else "lora"
        if kind != wanted:
            raise InferError(_wrong_kind(flag, adapter_path, config.get("peft_type"), kind))
        if pre_seq_len is not None and config.get("num_virtual_tokens") != pre_seq_len:
            raise InferError(
                f"--pt-checkpoint {adapter_path} has {config.get('num_virtual_tokens')} prefix tokens, "
                f"not --pre_seq_len {pre_seq_len}"
            )
    else:
        kind = "base"
    if model is None:
        model = config.get("base_model_name_or_path") if adapter_path else None
        if model:
            say(f"base model: {model} (from {adapter_path}/{ADAPTER_CONFIG})")
        else:
            model = str(DEFAULT_MODEL_DIR)
            say(f"--model not given: using the default model {model}")
        if adapter_path and not Path(model).is_dir():
            raise InferError(
                f"{flag} {adapter_path}: its base model {model} is not there; give the base with --model"
            )
    _check_model_folder(model)
    run_args = read_run_args(adapter_path or model)
    if kind == "base" and run_args:
        kind = "full"
    if adapter_path:
        _check_same_architecture(flag, adapter_path, run_args, model)
    own_tokenizer = adapter_path if adapter_path and _has_tokenizer(adapter_path) else model
    return Checkpoint(kind, model, adapter_path, tokenizer or own_tokenizer, run_args, config)


def _wrong_kind(flag: str, path: str, peft_type: Any, kind: str | None) -> str:
    if kind == "lora":
        return f"{flag} {path} is a LoRA adapter (peft_type LORA): load it with --adapter"
    if kind == "ptuning":
        return f"{flag} {path} is a P-Tuning v2 checkpoint (peft_type PREFIX_TUNING): load it with --pt-checkpoint"
    return f"{flag} {path}: unsupported peft_type {peft_type!r} (expected LORA or PREFIX_TUNING)"


def _check_model_folder(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise InferError(f"--model {path}: no such folder")
    if not (folder / "config.json").is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            raise InferError(
                f"--model {path} is a peft checkpoint, not a model: load it with --adapter or --pt-checkpoint"
            )
        raise InferError(f"--model {path}: not a model folder (no config.json)")


def _check_same_architecture(flag: str, adapter_path: str, run_args: dict, model: str) -> None:
    """An adapter whose training base (run_args.json) is at hand must match the base it is loaded on. (Shapes
    that differ also fail at load time; this catches the bases whose shapes happen to fit.)"""
    trained = (run_args.get("model") or {}).get("model_name_or_path")
    if not trained or not (Path(trained) / "config.json").is_file():
        return
    try:
        a = json.loads((Path(trained) / "config.json").read_text(encoding="utf-8"))
        b = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return
    for key in ARCHITECTURE_KEYS:
        if a.get(key) != b.get(key):
            raise InferError(
                f"{flag} {adapter_path} was trained on {trained} ({key} {a.get(key)}), which is not the "
                f"architecture of --model {model} ({key} {b.get(key)})"
            )


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


@dataclass
class Session:
    """A loaded model, ready to generate. template None with raw True: prompts are raw text only."""

    model: Any
    tokenizer: Any
    template: Template | None
    raw: bool
    stop_ids: list[int]
    device: str
    show_prompt: bool = False
    governor: ThreadGovernor | None = None  # on the CPU: torch's threads fitted to the machine's load


def load_session(args: argparse.Namespace, say: Callable[[str], Any] = to_stderr) -> Session:
    ckpt = resolve_checkpoint(
        args.model, args.pt_checkpoint, args.adapter, args.tokenizer, args.pre_seq_len, say
    )
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    template = choose_template(
        args.template, ckpt.run_args, tokenizer, getattr(args, "chat_template_kwargs", None)
    )
    raw = args.raw if args.raw is not None else template is None or trained_on_raw(ckpt.run_args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    bits = (ckpt.run_args.get("model") or {}).get("quantization_bit")
    if bits:
        say(
            f"note: trained on a {bits}-bit base; the base is loaded here in {str(dtype).removeprefix('torch.')}"
        )
    model = load_model(ckpt, dtype, device)
    stops = stop_token_ids(tokenizer, template, model.generation_config, ckpt.run_args)
    governor = ThreadGovernor(this_process_budget(args.threads), say) if device == "cpu" else None
    session = Session(model, tokenizer, template, raw, stops, device, args.show_prompt, governor)
    say(describe(ckpt, session, dtype))
    return session


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InferError(f"{path}: cannot load a tokenizer from it ({one_line(e)})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def choose_template(
    name: str | None, run_args: dict, tokenizer: Any, chat_template_kwargs: str | dict | None = None
) -> Template | None:
    """--template, else the one the checkpoint was trained with, else the tokenizer's own; None when the
    tokenizer has no chat template and none is named (raw prompts only). It renders with --chat_template_kwargs,
    else those the checkpoint was trained with."""
    if name is None:
        name = (run_args.get("model") or {}).get("template")
    if name == "tokenizer":
        name = None
    if name is None and not getattr(tokenizer, "chat_template", None):
        return None
    if chat_template_kwargs is None:
        chat_template_kwargs = (run_args.get("data") or {}).get("chat_template_kwargs")
    try:
        return get_template(name, tokenizer, chat_template_kwargs)
    except ValueError as e:
        raise InferError(str(e)) from e


def trained_on_raw(run_args: dict) -> bool:
    """Whether the checkpoint was trained on input-output data (rendered raw): its train_format says so, or
    (auto) the first record of its first training file is detected as input-output."""
    data = run_args.get("data") or {}
    fmt = data.get("train_format")
    if fmt == "input-output":
        return True
    files = data.get("train_file") or []
    if fmt != "auto" or not files:
        return False
    try:
        first_file = expand_paths(files[:1])[0]
    except DataFileError:  # the training data is gone: nothing says it was raw
        return False
    return detect_format(_first_record(first_file)) == "input-output"


def _first_record(path: Path) -> Any:
    """The first record of a .json array or JSON-lines file, read without loading the whole file."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        head = f.read(1 << 20)
    text = head.lstrip()
    try:
        if text.startswith("["):
            return json.JSONDecoder().raw_decode(text[1:].lstrip())[0]
        return json.loads(text.splitlines()[0]) if text else None
    except ValueError:
        return None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise InferError(f"--device {device}: {one_line(e)}") from e
    return device


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_model(ckpt: Checkpoint, dtype: Any, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.model_path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InferError(f"--model {ckpt.model_path}: cannot load the model ({one_line(e)})") from e
    if ckpt.adapter_path:
        model = load_adapter(model, ckpt)
    return model.to(device).eval()


def load_adapter(model: Any, ckpt: Checkpoint) -> Any:
    import warnings

    from peft import PeftModel

    flag = "--pt-checkpoint" if ckpt.kind == "ptuning" else "--adapter"
    misfit = (
        f"{flag} {ckpt.adapter_path} does not fit the base model {ckpt.model_path}, "
        "was it trained on another base?"
    )
    if ckpt.kind == "ptuning":
        _check_prefix_fits(ckpt.adapter_config, model.config, misfit)
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, ckpt.adapter_path)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        raise InferError(f"{misfit} ({one_line(e)})") from e
    _check_all_weights_loaded(peft_model, ckpt.adapter_path, misfit)
    return peft_model


def _check_prefix_fits(config: dict, model_config: Any, misfit: str) -> None:
    """peft builds the prefix from the checkpoint's own num_layers / heads / token_dim and would only fail
    mid-generation on a base with other ones: compare them with what peft derives from this base."""
    from peft import PrefixTuningConfig

    try:
        from peft.utils.other import _prepare_prompt_learning_config
    except ImportError:  # another peft: the load itself is the only check
        return
    expected = _prepare_prompt_learning_config(
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), model_config
    )
    for key in ("num_layers", "num_attention_heads", "token_dim"):
        if config.get(key) is not None and config[key] != getattr(expected, key):
            raise InferError(
                f"{misfit} (its prefix has {key} {config[key]}, this base needs {getattr(expected, key)})"
            )


def _check_all_weights_loaded(model: Any, path: str, misfit: str) -> None:
    """Every adapter weight the model expects is in the checkpoint and vice versa (peft loads leniently)."""
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = set(load_peft_weights(path, device="cpu"))
    expected = set(get_peft_model_state_dict(model))
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        what = (
            f"weights for {extra[0]} that this base has no place for"
            if extra
            else f"no weights for {missing[0]}"
        )
        raise InferError(f"{misfit} (the checkpoint has {what})")


def stop_token_ids(
    tokenizer: Any,
    template: Template | None = None,
    generation_config: Any = None,
    run_args: dict | None = None,
) -> list[int]:
    """Where generation stops: the model's generation-config EOS ids (Llama-3, Gemma and Phi-3 list several)
    ∪ the tokenizer's EOS ∪ the closing tokens training trains for the template (closing_token_ids) ∪ those the
    checkpoint's training data trained (run_args.json's data.closing_tokens)."""
    own = getattr(generation_config, "eos_token_id", None)
    ids = list(own) if isinstance(own, (list, tuple)) else ([] if own is None else [own])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if template is not None:  # raw prompts end with EOS alone
        ids += closing_token_ids(tokenizer, template)
    trained = ((run_args or {}).get("data") or {}).get("closing_tokens") or {}
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in trained if t in vocab]
    return list(dict.fromkeys(int(i) for i in ids))


def describe(ckpt: Checkpoint, session: Session, dtype: Any) -> str:
    what = {
        "base": f"model {ckpt.model_path}",
        "full": f"fine-tuned model {ckpt.model_path}",
        "lora": f"LoRA adapter {ckpt.adapter_path} on {ckpt.model_path}",
        "ptuning": f"P-Tuning v2 checkpoint {ckpt.adapter_path} on {ckpt.model_path} ("
        f"{ckpt.adapter_config.get('num_virtual_tokens')} prefix tokens, prefix_projection "
        f"{bool(ckpt.adapter_config.get('prefix_projection'))})",
    }[ckpt.kind]
    if session.template is None:
        template = "none (the tokenizer has no chat template)"
    else:
        template = session.template.name if session.template.chat_template else "the tokenizer's own"
    raw = "; --prompt and chat: raw text, no chat markup" if session.raw else ""
    stops = session.tokenizer.convert_ids_to_tokens(session.stop_ids)
    return (
        f"loaded {what}; tokenizer {ckpt.tokenizer_path}; chat template: {template}{raw}; "
        f"stops at {', '.join(stops)}; {session.device}, {str(dtype).removeprefix('torch.')}"
    )
