"""inference.py's library side: load a model from the arguments alone, then answer one prompt, chat on the
terminal, predict a data file in batches, score predictions (ROUGE/BLEU) and compare two prediction files;
`merge_main` is scripts/merge_adapter.py.

What is loaded:
- --model DIR: a base model or a full fine-tuned folder (default: the demo SmolLM2-135M-Instruct);
- --pt-checkpoint DIR: a P-Tuning v2 (peft prefix tuning) checkpoint on its base; its number of prefix tokens and
  prefix_projection come from its adapter_config.json (a projected prefix is saved as the projection's output,
  so no MLP is needed at inference);
- --adapter DIR: a LoRA / QLoRA adapter on its base.
A checkpoint's base defaults to its adapter_config.json's base_model_name_or_path, its tokenizer to the one saved
beside it, its chat template to the one it was trained with (run_args.json's model.template) and its prompt style
to raw text when it was trained on input-output data.

Every prompt is rendered as in training: the template's message dicts through apply_chat_template with
add_generation_prompt=True, tokenized with no added special tokens; input-output records as raw text with the
tokenizer's own prefix tokens (BOS) and no markup. Generation stops at every end of turn (stop_token_ids): the
model's own generation-config EOS ids, the tokenizer's EOS and the closing tokens training trains for the
template. Greedy unless --do_sample.

Bad input (a missing or mismatched checkpoint, unusable files) is one `error: ...` line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.args import RUN_ARGS_FILE
from chatft.data.formats import FORMAT_NAMES, DataFileError, detect_format, expand_paths, load_conversations
from chatft.data.schema import Conversation, Message
from chatft.data.templates import (
    NATIVE_TEMPLATES,
    Template,
    TemplateError,
    closing_token_ids,
    get_template,
    render_generation_prompt,
    tool_call_text,
    with_prefix_tokens,
)
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.metrics import METRIC_NAMES, score

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
PREDICTION_FIELDS = ("file", "record", "prompt", "reference", "prediction")
PEFT_KINDS = {"PREFIX_TUNING": "ptuning", "LORA": "lora"}
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


EXAMPLES = """\
examples:
  chat (stdin, streamed; 'clear', 'exit'):  python inference.py --adapter output/lora
  one prompt:                               python inference.py --pt-checkpoint output/pt --prompt "..."
  full fine-tuned model:                    python inference.py --model output/full --prompt "..."
  batch prediction + scores:                python inference.py --adapter output/lora --input_file dev.json \\
                                                --output_file pred.jsonl --eval
  score a predictions file:                 python inference.py --eval --predictions pred.jsonl
  before/after table:                       python inference.py --predictions pred.jsonl --compare base.jsonl
"""


class InferError(ValueError):
    """Bad input, explained in one line (main prints `error: <it>` and exits 2)."""


# ---------------------------------------------------------------------------------------------------- arguments


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inference.py",
        description="Chat with, or predict and evaluate with, a base model, a P-Tuning v2 checkpoint, a LoRA "
        "adapter or a full fine-tuned folder. Without --prompt, --input_file or --predictions: interactive chat.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        help=f"base model or full fine-tuned folder (default: an adapter's own base, else {DEFAULT_MODEL_DIR})",
    )
    m.add_argument(
        "--pt-checkpoint", "--pt_checkpoint", dest="pt_checkpoint", help="P-Tuning v2 checkpoint folder"
    )
    m.add_argument("--adapter", help="LoRA / QLoRA adapter folder")
    m.add_argument(
        "--pre_seq_len", type=int, help="check: the P-Tuning checkpoint must have this many prefix tokens"
    )
    m.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's own, else the model's)")
    m.add_argument(
        "--template",
        help="chat template: chatml, chatglm3, or tokenizer (its own); default: the one the checkpoint was trained with",
    )
    m.add_argument(
        "--raw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--prompt and chat as raw text with no chat markup (default: on when the checkpoint was trained on "
        "input-output data, or the tokenizer has no chat template)",
    )
    m.add_argument(
        "--device",
        default="auto",
        help="auto (the default: cuda if available, else cpu), cpu, cuda, cuda:1, ...",
    )
    m.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (the default): float32 on the CPU, bfloat16 (float16 without bf16 support) on a GPU",
    )
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="longest answer in tokens (default: 512)")
    g.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    g.add_argument(
        "--temperature", type=float, help="with --do_sample (default: the model's generation config)"
    )
    g.add_argument("--top_p", type=float, help="with --do_sample (default: the model's generation config)")
    g.add_argument("--seed", type=int, help="random seed (for --do_sample)")
    r = p.add_argument_group("modes")
    r.add_argument("--prompt", help="answer this one prompt and exit")
    r.add_argument("--system", help="system message for --prompt and chat")
    r.add_argument(
        "--tools",
        help="JSON file: the tools offered in --prompt and chat, as a training record's `tools` (a list), "
        "rendered as in training",
    )
    r.add_argument("--show_prompt", action="store_true", help="print each rendered prompt to stderr")
    r.add_argument("--input_file", nargs="+", help="batch prediction: data files in any training format")
    r.add_argument(
        "--input_format",
        default="auto",
        choices=["auto", *FORMAT_NAMES],
        help="format of --input_file (default auto: detected per file)",
    )
    r.add_argument("--output_file", help="batch prediction: JSONL output, one line per valid record")
    r.add_argument(
        "--batch_size", type=int, default=8, help="batch prediction: prompts per batch (default: 8)"
    )
    r.add_argument("--eval", action="store_true", help="score predictions: ROUGE-1/2/L, BLEU-4")
    r.add_argument(
        "--predictions", help="an existing predictions JSONL to --eval (or the tuned side of --compare)"
    )
    r.add_argument(
        "--metrics_file", help="where --eval writes its scores (default: <predictions>.metrics.json)"
    )
    r.add_argument(
        "--compare",
        metavar="BASE_PREDICTIONS",
        help="before/after table of a base model's predictions vs these",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except (InferError, DataFileError, TemplateError, OSError) as e:  # OSError: a file that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.predictions:
        return evaluate_files(args.predictions, args.compare, args.metrics_file)
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own tqdm shows the prediction progress
    if args.seed is not None:
        set_seed(args.seed)
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        _stderr("note: --temperature and --top_p only apply with --do_sample; decoding is greedy")
    tools = read_tools(args.tools) if args.tools else None
    session = load_session(args, say=_stderr)
    if tools is not None and session.raw:
        raise InferError("--tools needs chat prompts: this checkpoint answers raw prompts (see --raw)")
    options = GenerationOptions(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
    if args.input_file:
        predict_file(session, options, args.input_file, args.input_format, args.output_file, args.batch_size)
        if args.eval or args.compare:
            return evaluate_files(args.output_file, args.compare, args.metrics_file)
        return 0
    if args.prompt is not None:
        print(answer(session, options, args.prompt, args.system, tools))
        return 0
    return chat(session, options, args.system, tools)


def check_args(args: argparse.Namespace) -> None:
    if args.pt_checkpoint and args.adapter:
        raise InferError("give --pt-checkpoint or --adapter, not both")
    if args.predictions and args.input_file:
        raise InferError("give --input_file (predict, then score) or --predictions (score a file), not both")
    if args.predictions and not (args.eval or args.compare):
        raise InferError("--predictions is scored with --eval or --compare")
    if (args.eval or args.compare) and not (args.predictions or args.input_file):
        raise InferError("--eval and --compare need --predictions FILE or --input_file (predicted first)")
    if args.input_file and not args.output_file:
        raise InferError("--input_file needs --output_file (the predictions JSONL to write)")
    if args.prompt is not None and (args.input_file or args.predictions):
        raise InferError("--prompt answers one prompt; it does not go with --input_file or --predictions")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise InferError("--batch_size and --max_new_tokens must be at least 1")
    if args.pre_seq_len is not None and not args.pt_checkpoint:
        raise InferError("--pre_seq_len only checks a --pt-checkpoint")
    if args.tools and (args.input_file or args.predictions):
        raise InferError("--tools is for --prompt and chat; batch prediction takes each record's own tools")


def read_tools(path: str) -> list:
    """The --tools file: a JSON list of tool definitions (any JSON each, as in training data)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise InferError(f"--tools {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InferError(f"--tools {path}: not JSON ({e})") from e
    if not isinstance(tools, list) or not tools:
        raise InferError(f"--tools {path}: expected a non-empty JSON list of tool definitions")
    return tools


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- checkpoints


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
        raise InferError(f"{flag} {path}: unreadable {ADAPTER_CONFIG} ({_one_line(e)})") from e
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
        raise InferError(f"{folder}/{RUN_ARGS_FILE}: unreadable ({_one_line(e)})") from e
    return data if isinstance(data, dict) else {}


def resolve_checkpoint(
    model: str | None,
    pt_checkpoint: str | None = None,
    adapter: str | None = None,
    tokenizer: str | None = None,
    pre_seq_len: int | None = None,
    say: Callable[[str], Any] = _stderr,
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


# ---------------------------------------------------------------------------------------------------- loading


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


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None


def load_session(args: argparse.Namespace, say: Callable[[str], Any] = _stderr) -> Session:
    ckpt = resolve_checkpoint(
        args.model, args.pt_checkpoint, args.adapter, args.tokenizer, args.pre_seq_len, say
    )
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    template = choose_template(args.template, ckpt.run_args, tokenizer)
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
    session = Session(model, tokenizer, template, raw, stops, device, args.show_prompt)
    say(describe(ckpt, session, dtype))
    return session


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InferError(f"{path}: cannot load a tokenizer from it ({_one_line(e)})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def choose_template(name: str | None, run_args: dict, tokenizer: Any) -> Template | None:
    """--template, else the one the checkpoint was trained with, else the tokenizer's own; None when the
    tokenizer has no chat template and none is named (raw prompts only)."""
    if name is None:
        name = (run_args.get("model") or {}).get("template")
    if name == "tokenizer":
        name = None
    if name is None and not getattr(tokenizer, "chat_template", None):
        return None
    return get_template(name, tokenizer)


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
        raise InferError(f"--device {device}: {_one_line(e)}") from e
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
        raise InferError(f"--model {ckpt.model_path}: cannot load the model ({_one_line(e)})") from e
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
        raise InferError(f"{misfit} ({_one_line(e)})") from e
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


# ---------------------------------------------------------------------------------------------------- prompts


def render_prompt(session: Session, conv: Conversation) -> tuple[str, list[int]]:
    """(the text the tokenizer encodes, the ids) of a conversation that ends where the model answers."""
    tokenizer = session.tokenizer
    if conv.raw:
        text = conv.messages[-1].content
        return text, with_prefix_tokens(tokenizer, text)
    template = session.template
    if template is None:
        raise TemplateError(
            "the tokenizer has no chat template and this record is a chat: choose one with --template "
            f"({', '.join(NATIVE_TEMPLATES)})"
        )
    text = render_generation_prompt(conv, tokenizer, template)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_for(
    session: Session, history: list[Message], system: str | None, tools: list | None = None
) -> Conversation:
    if session.raw:
        return Conversation([history[-1]], raw=True)
    head = [Message("system", system)] if system else []
    return Conversation(head + history, tools=tools)


def split_last_answer(conv: Conversation) -> tuple[Conversation, str]:
    """(the conversation up to its last assistant message, that message's text) of a data record."""
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    message = conv.messages[last]
    reference = message.content
    if message.tool_calls:
        reference = (reference + "\n" if reference else "") + tool_call_text(message.tool_calls)
    if not any(m.role == "user" for m in conv.messages[:last]):
        raise TemplateError("no user message before the last assistant message")
    return Conversation(conv.messages[:last], tools=conv.tools, raw=conv.raw), reference


# ---------------------------------------------------------------------------------------------------- generation


def generation_config(session: Session, options: GenerationOptions) -> Any:
    from transformers import GenerationConfig

    own = session.model.generation_config
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        eos_token_id=session.stop_ids,
        pad_token_id=session.tokenizer.pad_token_id,
        bos_token_id=own.bos_token_id,
        use_cache=True,  # a checkpoint saved mid-training has use_cache False in its config
    )
    if options.do_sample:
        config.temperature = options.temperature if options.temperature is not None else own.temperature
        config.top_p = options.top_p if options.top_p is not None else own.top_p
        config.top_k = own.top_k
    return config


def generate(
    session: Session, prompts: list[list[int]], options: GenerationOptions, streamer: Any = None
) -> list[list[int]]:
    """The new ids of each prompt (left-padded into one batch), cut before the first stop token."""
    import torch

    pad = session.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=session.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=session.device)
    with torch.inference_mode():
        out = session.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=generation_config(session, options),
            streamer=streamer,
        )
    stops = set(session.stop_ids)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:end])
    return results


def decode(session: Session, ids: list[int]) -> str:
    """The answer's text; a trailing U+FFFD (a multi-byte character cut by max_new_tokens) is dropped."""
    return session.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


def answer(
    session: Session,
    options: GenerationOptions,
    prompt: str,
    system: str | None = None,
    tools: list | None = None,
) -> str:
    conv = conversation_for(session, [Message("user", prompt)], system, tools)
    text, ids = render_prompt(session, conv)
    _show(session, text)
    return decode(session, generate(session, [ids], options)[0])


def _show(session: Session, text: str) -> None:
    if session.show_prompt:
        _stderr(f"--- prompt ---\n{text}\n--- end of prompt ---")


# ---------------------------------------------------------------------------------------------------- chat


def chat(
    session: Session, options: GenerationOptions, system: str | None = None, tools: list | None = None
) -> int:
    """Multi-turn chat on the terminal, the answer streamed token by token. Lines come from stdin (a pipe
    works); `clear` forgets the history; `exit` or the end of the input ends (Ctrl-C too, with status 130)."""
    echo = not sys.stdin.isatty()  # piped input is not shown by the terminal: show it in the transcript
    note = "raw prompts: each line is answered on its own, no history; " if session.raw else ""
    print(f"Chat ({note}'clear' forgets the history, 'exit' ends).", flush=True)
    try:
        _chat_loop(session, options, system, tools, echo)
    except KeyboardInterrupt:
        print(flush=True)
        return 130
    return 0


def _chat_loop(
    session: Session, options: GenerationOptions, system: str | None, tools: list | None, echo: bool
) -> None:
    from transformers import TextStreamer

    history: list[Message] = []
    while True:
        try:
            line = input("\nUser: ")
        except EOFError:
            print(flush=True)
            return
        if echo:
            print(line, flush=True)
        text = line.strip()
        if text == "exit":
            return
        if text == "clear":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append(Message("user", text))
        prompt_text, ids = render_prompt(session, conversation_for(session, history, system, tools))
        _show(session, prompt_text)
        print("\nAssistant: ", end="", flush=True)
        streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = decode(session, generate(session, [ids], options, streamer=streamer)[0])
        history.append(Message("assistant", reply))
        if session.raw:
            history.clear()


# ---------------------------------------------------------------------------------------------------- batch prediction


@dataclass
class PromptItem:
    file: str
    record: int
    prompt: str
    ids: list[int]
    reference: str


def predict_file(
    session: Session,
    options: GenerationOptions,
    input_files: list[str],
    input_format: str,
    output_file: str,
    batch_size: int,
) -> int:
    """Predict the last assistant message of every valid record into output_file (JSONL); invalid records
    are listed with their FILE:LINE and counted. Returns the number of predictions written."""
    try:
        loaded = load_conversations(input_files, input_format, log=_stderr)
    except ValueError as e:
        raise InferError(str(e)) from e
    items, problems = prompt_items(session, loaded.records)
    problems = [str(p) for p in loaded.problems] + problems
    for problem in problems:
        _stderr(f"invalid record: {problem}")
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in predict_items(session, options, items, batch_size):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    invalid = f"; {len(problems)} invalid record(s) skipped, listed above" if problems else ""
    _stderr(f"{len(items)} prediction(s) written to {output_file}{invalid}")
    return len(items)


def predict_items(
    session: Session, options: GenerationOptions, items: list[PromptItem], batch_size: int
) -> Iterator[dict]:
    """{"file", "record", "prompt", "reference", "prediction"} per item, generated in batches (progress bar)."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc="predicting", file=sys.stderr) as bar:
        for batch in _chunks(items, batch_size):
            for item, new_ids in zip(batch, generate(session, [i.ids for i in batch], options), strict=True):
                row = {"file": item.file, "record": item.record, "prompt": item.prompt}
                yield row | {"reference": item.reference, "prediction": decode(session, new_ids)}
            bar.update(len(batch))


def generation_scores(
    model: Any,
    tokenizer: Any,
    template: Template | None,
    records: list[tuple[str, int, Conversation]],
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, float]:
    """ROUGE/BLEU of greedy answers to the records' last assistant turns, for evaluation during training."""
    stops = stop_token_ids(tokenizer, template, model.generation_config)
    session = Session(model, tokenizer, template, False, stops, str(model.device))
    items, _ = prompt_items(session, records)
    rows = list(predict_items(session, GenerationOptions(max_new_tokens), items, batch_size))
    return score([r["prediction"] for r in rows], [r["reference"] for r in rows])


def prompt_items(
    session: Session, records: list[tuple[str, int, Conversation]]
) -> tuple[list[PromptItem], list[str]]:
    items, problems = [], []
    for file, line, conv in records:
        try:
            prompt_conv, reference = split_last_answer(conv)
            text, ids = render_prompt(session, prompt_conv)
        except TemplateError as e:
            problems.append(f"{file}:{line}: {e}")
            continue
        items.append(PromptItem(file, line, text, ids, reference))
    return items, problems


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------------- evaluation


def read_predictions(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise InferError(f"{path}: no such predictions file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InferError(f"{path}: not UTF-8 ({_one_line(e)})") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InferError(f"{path}:{number}: invalid JSON ({_one_line(e)})") from e
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("prediction", "reference")
        ):
            raise InferError(f"{path}:{number}: needs string fields prediction and reference")
        rows.append(row)
    if not rows:
        raise InferError(f"{path}: no predictions in it")
    return rows


def score_rows(rows: list[dict]) -> dict[str, float]:
    return score([r["prediction"] for r in rows], [r["reference"] for r in rows])


def evaluate_files(predictions: str, base_predictions: str | None, metrics_file: str | None) -> int:
    """Score a predictions file (and print the before/after comparison with base_predictions); the scores go
    to stdout and, as JSON, to metrics_file (default <predictions>.metrics.json)."""
    rows = read_predictions(predictions)
    scores = score_rows(rows)
    result: dict[str, Any] = {"predictions": predictions, "records": len(rows), "scores": scores}
    if base_predictions:
        base_rows = read_predictions(base_predictions)
        check_same_records(base_rows, rows, base_predictions, predictions)
        base_scores = score_rows(base_rows)
        print(comparison_table(base_rows, rows, _terminal_width()))
        print(scores_side_by_side(base_scores, scores))
        result["base"] = {"predictions": base_predictions, "scores": base_scores}
    else:
        print(format_scores(scores, len(rows)))
    target = Path(metrics_file or f"{predictions}.metrics.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _stderr(f"scores written to {target}")
    return 0


def check_same_records(base: list[dict], tuned: list[dict], base_path: str, tuned_path: str) -> None:
    if len(base) != len(tuned):
        raise InferError(f"--compare: {base_path} has {len(base)} predictions, {tuned_path} {len(tuned)}")
    for i, (a, b) in enumerate(zip(base, tuned, strict=True), start=1):
        if a["reference"] != b["reference"]:
            raise InferError(
                f"--compare: prediction {i} has another reference in {base_path} than in {tuned_path}"
            )


def format_scores(scores: dict[str, float], records: int) -> str:
    lines = [f"scores over {records} record(s):"]
    lines += [f"  {name:<8} {scores[name]:8.4f}" for name in METRIC_NAMES]
    return "\n".join(lines)


def scores_side_by_side(base: dict[str, float], tuned: dict[str, float]) -> str:
    lines = [f"  {'metric':<8} {'base':>9} {'tuned':>9} {'change':>9}"]
    for name in METRIC_NAMES:
        lines.append(f"  {name:<8} {base[name]:9.4f} {tuned[name]:9.4f} {tuned[name] - base[name]:+9.4f}")
    return "\n".join(lines)


def comparison_table(base: list[dict], tuned: list[dict], width: int = 100) -> str:
    """Per record: prompt, reference, base answer, tuned answer, each on one shortened line."""
    blocks = []
    text_width = max(20, width - 14)
    for i, (a, b) in enumerate(zip(base, tuned, strict=True), start=1):
        where = f"{b.get('file', '?')}:{b.get('record', '?')}"
        rows = [("prompt", b.get("prompt", "")), ("reference", b["reference"])]
        rows += [("base", a["prediction"]), ("tuned", b["prediction"])]
        lines = [f"[{i}] {where}"] + [f"  {label:<10}| {shorten(text, text_width)}" for label, text in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def shorten(text: str, width: int) -> str:
    """One line (white space collapsed) of at most width terminal columns (a CJK character takes two): the
    head and the tail, joined by ' … '."""
    flat = " ".join(text.split())
    if _columns(flat) <= width:
        return flat
    keep = width - 3
    head = _fit(flat, keep // 2)
    tail = _fit(flat[::-1], keep - _columns(head))[::-1]
    return head + " … " + tail


def _columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fit(text: str, columns: int) -> str:
    """The longest start of text that fits in columns."""
    used = 0
    for i, c in enumerate(text):
        used += _columns(c)
        if used > columns:
            return text[:i]
    return text


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


# ---------------------------------------------------------------------------------------------------- merge


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
    _stderr(f"merged {adapter} into {base}: {out}")


# ---------------------------------------------------------------------------------------------------- helpers


def _one_line(error: BaseException) -> str:
    """The most telling line of an error: a 'size mismatch' line when there is one, else the first."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line:
            return line
    return lines[0] if lines else type(error).__name__
