"""inference.py's arguments and main: one prompt, the terminal chat, batch prediction, scoring and comparison.

Bad input (a missing or mismatched checkpoint, unusable files) is one `error: ...` line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from chatft.data.formats import FORMAT_NAMES, DataFileError
from chatft.data.templates import TemplateError
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.inference.chat import Shown, chat
from chatft.inference.common import InferError, to_stderr
from chatft.inference.evaluation import evaluate_files, predict_file
from chatft.inference.generation import GenerationOptions, answer
from chatft.inference.loading import load_session
from chatft.inference.reasoning import ANSWER, REASONING

EXAMPLES = """\
examples:
  chat (stdin, streamed; 'clear', 'exit'):  python inference.py --adapter output/lora
  one prompt:                               python inference.py --pt-checkpoint output/pt --prompt "..."
  full fine-tuned model:                    python inference.py --model output/full --prompt "..."
  batch prediction + scores:                python inference.py --adapter output/lora --input_file dev.json \\
                                                --output_file pred.jsonl --eval
  score a predictions file:                 python inference.py --eval --predictions pred.jsonl
  before/after table:                       python inference.py --predictions pred.jsonl --compare base.jsonl
  OpenAI API + chat page (127.0.0.1:8000):  python inference.py --serve --adapter output/lora
  two models side by side:                  python inference.py --serve --serve_model base=models/SmolLM2-135M-Instruct \\
                                                --serve_model tuned=output/lora
"""


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
        "--chat_template_kwargs",
        metavar="JSON",
        help="variables for the chat template, e.g. '{\"enable_thinking\": false}' (default: those the checkpoint "
        "was trained with)",
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
    m.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: the cores this process may use, fewer while other work keeps "
        "cores busy: on a shared CPU spin-waiting threads can be several times slower, bench/serve.py)",
    )
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="longest answer in tokens (default: 512)")
    g.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    g.add_argument(
        "--temperature", type=float, help="with --do_sample (default: the model's generation config)"
    )
    g.add_argument("--top_p", type=float, help="with --do_sample (default: the model's generation config)")
    g.add_argument("--seed", type=int, help="random seed (for --do_sample)")
    g.add_argument(
        "--repetition_penalty",
        type=float,
        help="above 1: discourage tokens already in the prompt or the answer, greedy or sampled (transformers' "
        "repetition_penalty; default: the model's generation config, usually 1.0 = none)",
    )
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
        "--score_reasoning",
        action="store_true",
        help="--eval/--compare: also score the predicted reasoning against the records' own reasoning (rows whose "
        "record has some); the answer is scored without its reasoning either way",
    )
    r.add_argument(
        "--metrics_file", help="where --eval writes its scores (default: <predictions>.metrics.json)"
    )
    r.add_argument(
        "--compare",
        metavar="BASE_PREDICTIONS",
        help="before/after table of a base model's predictions vs these",
    )
    v = p.add_argument_group("serve (an OpenAI-compatible API and a chat page)")
    v.add_argument("--serve", action="store_true", help="serve the model(s) over HTTP instead")
    v.add_argument(
        "--serve_model",
        action="append",
        metavar="NAME=PATH",
        help="serve this model folder, LoRA adapter or P-Tuning checkpoint (the kind is read from the folder) "
        "under NAME; repeat for several (--model is then the base of adapters that name none). Default: the "
        "one model given by --model/--adapter/--pt-checkpoint, named after its folder",
    )
    v.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    v.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    v.add_argument(
        "--api_key",
        default=os.environ.get("CHATFT_API_KEY"),
        help="clients must send Authorization: Bearer KEY (default: $CHATFT_API_KEY); required beyond 127.0.0.1",
    )
    v.add_argument(
        "--max_queue",
        type=int,
        default=16,
        help="requests admitted at once, generating or waiting; one more gets 503 + Retry-After (default: 16)",
    )
    v.add_argument(
        "--max_time", type=float, default=120.0, help="seconds one generation may take (default: 120)"
    )
    v.add_argument(
        "--max_batch",
        type=int,
        default=8,
        help="waiting requests generated together in one batch (same model and sampling, no seed; default: 8, "
        "1: one at a time)",
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
        return evaluate_files(args.predictions, args.compare, args.metrics_file, args.score_reasoning)
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own tqdm shows the prediction progress
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.seed is not None:
        set_seed(args.seed)
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        to_stderr("note: --temperature and --top_p only apply with --do_sample; decoding is greedy")
    if args.serve:
        from chatft.inference.serve import serve_main

        return serve_main(args)
    tools = read_tools(args.tools) if args.tools else None
    session = load_session(args, say=to_stderr)
    if tools is not None and session.raw:
        raise InferError("--tools needs chat prompts: this checkpoint answers raw prompts (see --raw)")
    options = GenerationOptions.from_args(args)
    if args.input_file:
        predict_file(session, options, args.input_file, args.input_format, args.output_file, args.batch_size)
        if args.eval or args.compare:
            return evaluate_files(args.output_file, args.compare, args.metrics_file, args.score_reasoning)
        return 0
    if args.prompt is not None:
        shown = Shown(sys.stdout.isatty())
        reasoning, reply = answer(session, options, args.prompt, args.system, tools)
        shown.add([(REASONING, reasoning), (ANSWER, reply)])
        shown.end()
        print(flush=True)
        return 0
    return chat(session, options, args.system, tools)


def check_args(args: argparse.Namespace) -> None:
    if args.pt_checkpoint and args.adapter:
        raise InferError("give --pt-checkpoint or --adapter, not both")
    if args.serve and (args.prompt is not None or args.input_file or args.predictions or args.tools):
        raise InferError(
            "--serve answers clients; it does not go with --prompt, --input_file, --predictions, --tools"
        )
    if args.serve_model and not args.serve:
        raise InferError("--serve_model is for --serve")
    if args.serve_model and (args.adapter or args.pt_checkpoint):
        raise InferError("with --serve_model, name every served model: --serve_model NAME=ADAPTER_OR_MODEL")
    if args.serve and (args.max_queue < 1 or args.max_batch < 1 or args.max_time <= 0):
        raise InferError("--max_queue and --max_batch must be at least 1, --max_time positive")
    if args.serve:
        from chatft.inference.serve import check_host

        check_host(args.host, args.api_key)
    if args.predictions and args.input_file:
        raise InferError("give --input_file (predict, then score) or --predictions (score a file), not both")
    if args.predictions and not (args.eval or args.compare):
        raise InferError("--predictions is scored with --eval or --compare")
    if args.score_reasoning and not (args.eval or args.compare):
        raise InferError("--score_reasoning goes with --eval or --compare")
    if (args.eval or args.compare) and not (args.predictions or args.input_file):
        raise InferError("--eval and --compare need --predictions FILE or --input_file (predicted first)")
    if args.input_file and not args.output_file:
        raise InferError("--input_file needs --output_file (the predictions JSONL to write)")
    if args.prompt is not None and (args.input_file or args.predictions):
        raise InferError("--prompt answers one prompt; it does not go with --input_file or --predictions")
    if args.threads is not None and args.threads < 1:
        raise InferError("--threads must be at least 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise InferError("--batch_size and --max_new_tokens must be at least 1")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise InferError(f"--repetition_penalty must be positive (1.0: none), got {args.repetition_penalty}")
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
