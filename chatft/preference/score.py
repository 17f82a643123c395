"""scripts/score_pairs.py: how a model ranks the two replies of preference pairs.

Each pair is encoded as training encodes it (chatft.preference.encode, with the checkpoint's chat template), and
scored by log p(reply | prompt): the sum over the reply's tokens and its closing token. Printed:
- preference accuracy: the share of pairs where the model gives the chosen reply the higher log-probability, and
  the mean log-probability margin, log p(chosen) - log p(rejected);
- with a reference (--reference_adapter or --reference_model): DPO's implicit rewards, beta * (log p - log p_ref)
  of each reply, as TRL logs them: reward accuracy (the chosen reward above the rejected one) and mean margin.

Exit status: 0 scored, 1 some records invalid (listed, the rest scored), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chatft.data.formats import DataFileError
from chatft.data.templates import TemplateError
from chatft.inference.common import InferError
from chatft.inference.loading import load_model, load_tokenizer, resolve_checkpoint
from chatft.preference.encode import prepare_preferences


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="score_pairs.py",
        description="How a model ranks the replies of preference pairs: preference accuracy and log-probability "
        "margin; with a reference, DPO's reward accuracy and margin. Exit status: 0 scored, 1 some records "
        "invalid, 2 usage error.",
    )
    p.add_argument("--pairs", nargs="+", required=True, help="preference data, any layout of --stage dpo")
    p.add_argument("--model", help="base model or full fine-tuned folder (default: an adapter's base)")
    p.add_argument("--adapter", help="LoRA adapter folder")
    p.add_argument("--reference_model", help="the reference for rewards: a model folder")
    p.add_argument("--reference_adapter", help="the reference for rewards: a LoRA adapter folder")
    p.add_argument("--beta", type=float, default=0.1, help="reward scale (default: %(default)s)")
    p.add_argument("--max_seq_length", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4, help="pairs per forward (default: %(default)s)")
    p.add_argument("--output", help="also write the figures to this JSON file")
    return p


def batch_logps(model, batch: dict) -> torch.Tensor:
    """Per row of a preference batch (TRL's collator: chosen rows, then rejected rows), the sum of log p(token)
    over its completion (the reply and its closing token)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def pair_logps(
    model, rows: list[dict], pad_token_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen), log p(rejected)) of every pair of rows (prompt_ids, chosen_ids, rejected_ids)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    chosen, rejected = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        c, r = batch_logps(model, batch).chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def figures(chosen, rejected, ref_chosen=None, ref_rejected=None, beta: float = 0.1) -> dict:
    out = {
        "pairs": len(chosen),
        "preference_accuracy": (chosen > rejected).float().mean().item(),
        "logp_margin": (chosen - rejected).mean().item(),
        "logp_chosen": chosen.mean().item(),
        "logp_rejected": rejected.mean().item(),
    }
    if ref_chosen is not None:
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        out |= {
            "beta": beta,
            "reward_accuracy": (reward_chosen > reward_rejected).float().mean().item(),
            "reward_margin": (reward_chosen - reward_rejected).mean().item(),
            "reward_chosen": reward_chosen.mean().item(),
            "reward_rejected": reward_rejected.mean().item(),
        }
    return out


def report(scores: dict) -> list[str]:
    n = scores["pairs"]
    lines = [
        f"pairs: {n}",
        f"preference accuracy (log p(chosen) > log p(rejected)): {scores['preference_accuracy']:.3f} "
        f"({round(scores['preference_accuracy'] * n)}/{n})",
        f"mean log-probability: chosen {scores['logp_chosen']:.2f}, rejected {scores['logp_rejected']:.2f}, "
        f"margin {scores['logp_margin']:.2f}",
    ]
    if "reward_accuracy" in scores:
        lines.append(
            f"rewards (beta {scores['beta']:g} x log-ratio to the reference): accuracy {scores['reward_accuracy']:.3f}, "
            f"margin {scores['reward_margin']:.3f} (chosen {scores['reward_chosen']:.3f}, rejected "
            f"{scores['reward_rejected']:.3f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        ckpt = resolve_checkpoint(args.model, adapter=args.adapter, say=say)
        tokenizer = load_tokenizer(ckpt.tokenizer_path)
        template = (ckpt.run_args.get("model") or {}).get("template")
        prepared = prepare_preferences(
            args.pairs, "auto", tokenizer, template, args.max_seq_length, log=lambda _m: None
        )
        if not len(prepared.dataset):
            raise ValueError("no valid pair to score")
        reference = None
        if args.reference_model or args.reference_adapter:
            reference = resolve_checkpoint(args.reference_model, adapter=args.reference_adapter, say=say)
        model = load_model(ckpt, torch.float32, "cpu")
    except (DataFileError, TemplateError, InferError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in prepared.problems:
        print(f"invalid record: {problem}", file=sys.stderr)
    rows = prepared.dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    chosen, rejected = pair_logps(model, rows, tokenizer.pad_token_id, args.batch_size)
    ref = (None, None)
    if reference is not None:
        del model
        ref = pair_logps(
            load_model(reference, torch.float32, "cpu"), rows, tokenizer.pad_token_id, args.batch_size
        )
    scores = figures(chosen, rejected, *ref, beta=args.beta)
    print("\n".join(report(scores)))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(scores, indent=2) + "\n")
    return 1 if prepared.problems else 0
