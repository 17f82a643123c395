"""The data checker behind scripts/check_data.py; finetune.py prints the same report before training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chatft.args import FORMATS, STAGES
from chatft.data.dataset import PreparedData, prepare_data, sanity_check_lines
from chatft.data.formats import DataFileError
from chatft.data.templates import NATIVE_TEMPLATES, TemplateError
from chatft.demo_model import DEFAULT_MODEL_DIR

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def report_lines(prepared: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Sanity Check of the first example, the statistics, then every invalid record as FILE:LINE: field: what."""
    lines: list[str] = []
    if len(prepared.dataset):
        first = prepared.dataset[0]
        lines += sanity_check_lines(first["input_ids"], first["labels"], tokenizer)
    lines += prepared.stats.lines()
    if prepared.problems:
        lines.append(f"{len(prepared.problems)} invalid record(s):")
        lines += [str(p) for p in prepared.problems]
    return lines


def position_warning(model_config, max_seq_length: int, lengths: list[int]) -> str | None:
    """A warning when --max_seq_length is above the model's max_position_embeddings (None otherwise)."""
    limit = getattr(
        getattr(model_config, "text_config", None) or model_config, "max_position_embeddings", None
    )
    if not limit or max_seq_length <= limit:
        return None
    longer = sum(1 for n in lengths if n > limit)
    return (
        f"warning: --max_seq_length {max_seq_length} is above the model's max_position_embeddings {limit}: "
        f"{longer} example(s) are longer than {limit} tokens, positions the model was never trained on"
    )


DUMP_HELP = (
    "write what will be trained to this path, one JSON object per line and per training example: "
    '{"file", "record", "input_ids", "labels"} for sft. record is the example\'s source record: its line in a '
    "JSON-lines file (1-based, blank lines counted), or its 1-based element in a .json array. A conversation the chat "
    "template splits (it renders earlier turns differently once later turns follow: each turn is trained in the "
    "context it is generated in) gives several lines with the same file and record, in the order of their turns. "
    "labels are aligned with input_ids (the model shifts them), -100 where not trained. Only the examples that are "
    "trained are written, truncated as training truncates them; invalid and skipped records are in the report. "
    "Preference stages write their pair columns (prompt, chosen, rejected ids) with file and record instead."
)


def write_dump(prepared: PreparedData, path: str) -> None:
    """One JSON object per kept example: its file, its record number in that file, input_ids and labels (the
    contract is DUMP_HELP: people audit what is trained with it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in prepared.dataset:
            row = {
                "file": ex["file"],
                "record": ex["record"],
                "input_ids": ex["input_ids"],
                "labels": ex["labels"],
            }
            f.write(json.dumps(row) + "\n")


def load_tokenizer_or_explain(path: str) -> PreTrainedTokenizerBase:
    if not Path(path).exists():
        hint = " (run scripts/get_demo_model.sh first)" if Path(path) == DEFAULT_MODEL_DIR else ""
        raise ValueError(f"no tokenizer at {path}{hint}")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds for a folder that is not a tokenizer
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Validate training data and show exactly what will be trained: a Sanity Check of the first "
        "example (token, id, label; -100 = not trained), statistics, and every invalid record as "
        "FILE:LINE: field: problem. Exit status: 0 all valid, 1 some invalid, 2 usage error."
    )
    p.add_argument(
        "--train_file", nargs="+", required=True, help="one or more .json/.jsonl files or directories"
    )
    p.add_argument("--train_format", default="auto", choices=FORMATS)
    p.add_argument(
        "--stage",
        default="sft",
        choices=[s for s in STAGES if s != "grpo"],  # grpo: finetune.py checks its prompts and rewards
        help="sft: conversations; dpo, orpo, simpo: preference pairs (a Sanity Check of both replies); kto: "
        "labelled replies, or pairs (default: %(default)s)",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="tokenizer source (default: %(default)s)")
    p.add_argument(
        "--template",
        default=None,
        choices=list(NATIVE_TEMPLATES),
        help="native chat template; default: the tokenizer's own chat template",
    )
    p.add_argument(
        "--chat_template_kwargs",
        default=None,
        metavar="JSON",
        help="extra variables for the chat template, e.g. '{\"enable_thinking\": false}' (as finetune.py takes them)",
    )
    p.add_argument("--max_seq_length", type=int, default=2048)
    p.add_argument("--max_source_length", type=int, default=None, help="input-output: cut prompts to this")
    p.add_argument("--max_target_length", type=int, default=None, help="input-output: cut responses to this")
    p.add_argument("--preprocessing_num_workers", type=int, default=None)
    p.add_argument("--dump", default=None, metavar="FILE", help=DUMP_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer_or_explain(args.model)
        if args.stage == "sft":
            prepared = prepare_data(
                args.train_file,
                args.train_format,
                tokenizer,
                args.template,
                args.max_seq_length,
                args.max_source_length,
                args.max_target_length,
                args.preprocessing_num_workers,
                chat_template_kwargs=args.chat_template_kwargs,
            )
            lines, dump = report_lines(prepared, tokenizer), write_dump
        else:
            from chatft.preference import encode

            encode.check_target_length(args.max_target_length)
            prepared = encode.prepare_preferences(
                args.train_file,
                args.train_format,
                tokenizer,
                args.template,
                args.max_seq_length,
                args.max_source_length,
                unpaired=args.stage == "kto",
                chat_template_kwargs=args.chat_template_kwargs,
            )
            lines, dump = encode.report_lines(prepared, tokenizer), encode.write_dump
    except (DataFileError, TemplateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(lines))
    if (Path(args.model) / "config.json").is_file():
        from transformers import AutoConfig

        warning = position_warning(
            AutoConfig.from_pretrained(args.model), args.max_seq_length, prepared.stats.lengths
        )
        if warning:
            print(warning)
    if args.dump:
        dump(prepared, args.dump)
        print(f"wrote {len(prepared.dataset)} examples to {args.dump}")
    return EXIT_INVALID if prepared.problems else EXIT_OK
