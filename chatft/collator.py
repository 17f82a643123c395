"""Batching: dynamic padding to the longest example of the batch (rounded up to pad_to_multiple_of where given:
a multiple of 64 on the CPU, chatft.training.step_plan, but not past max_seq_length), or packed rows.

Both also return `num_examples` and `num_tokens` (real, non-pad tokens of the examples) for the step statistics;
chatft.training.trainer.ChatTrainer takes them out before the forward, so use them with that Trainer. An empty item (a row
that completes the last step of an epoch, chatft.packing) becomes one pad token with no label: no example, no
trained token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatft.data.templates import IGNORE_INDEX
from chatft.packing import PACKED_SDPA, position_ids_for

# attention backends that take a whole batch flattened into one row (flash and chatft's packed sdpa: one causal
# attention per example over cu_seqlens; flex: a block mask built from the position ids), so a packed batch needs
# no padding at all
FLATTENING_BACKENDS = ("flash_attention_2", "flash_attention_3", "flex_attention", PACKED_SDPA)
CU_SEQLENS_BACKENDS = ("flash_attention_2", "flash_attention_3", PACKED_SDPA)


def padded_length(lengths, multiple: int | None, limit: int | None = None) -> int:
    """The longest of lengths (at least 1: a batch of empty items is one pad token), rounded up to `multiple` but
    not past `limit` (unless the longest itself is longer)."""
    longest = max(1, *lengths)
    if not multiple:
        return longest
    rounded = -(-longest // multiple) * multiple
    return min(rounded, max(limit, longest)) if limit else rounded


@dataclass
class PadCollator:
    """max_length caps the rounding up to pad_to_multiple_of: padded tokens get positions too, and a model with
    learned positions may have no more than max_seq_length of them."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_length: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = padded_length(
            (len(f["input_ids"]) for f in features), self.pad_to_multiple_of, self.max_length
        )
        input_ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append(
                [1] * max(n, 1) + [0] * (pad - (n == 0))
            )  # an empty item attends to its one pad token
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "num_examples": torch.tensor(sum(1 for f in features if f["input_ids"]), dtype=torch.long),
            "num_tokens": torch.tensor(sum(len(f["input_ids"]) for f in features), dtype=torch.long),
        }


@dataclass
class PackedCollator:
    """Packed rows (chatft.packing.PackedDataset items) -> input_ids, labels, position_ids; no attention_mask.

    Rows are padded to the longest row of the batch (rounded up to pad_to_multiple_of: a fixed shape); the padding
    restarts the position ids, so it is a segment of its own. flatten=True (flash / flex / chatft's packed sdpa)
    puts the whole batch in one row instead: no padding at all, and with flash_kwargs the sequence boundaries also
    go in explicitly as cu_seq_lens (no inference per layer).
    """

    pad_token_id: int
    flatten: bool = False
    flash_kwargs: bool = False
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_backend(cls, pad_token_id: int, attn_implementation: str | None) -> PackedCollator:
        impl = attn_implementation or "sdpa"
        return cls(
            pad_token_id, flatten=impl in FLATTENING_BACKENDS, flash_kwargs=impl in CU_SEQLENS_BACKENDS
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        num_examples = sum(len(f["seq_lens"]) for f in features)
        num_tokens = sum(len(f["input_ids"]) for f in features)
        if self.flatten:
            rows = [
                (
                    [t for f in features for t in f["input_ids"]],
                    [t for f in features for t in f["labels"]],
                    [n for f in features for n in f["seq_lens"]],
                )
            ]
        else:
            rows = [(f["input_ids"], f["labels"], f["seq_lens"]) for f in features]
        longest = padded_length((len(ids) for ids, _, _ in rows), self.pad_to_multiple_of)
        input_ids, labels, positions = [], [], []
        for ids, lab, seq_lens in rows:
            pad = longest - len(ids)
            input_ids.append(list(ids) + [self.pad_token_id] * pad)
            labels.append(list(lab) + [IGNORE_INDEX] * pad)
            positions.append(position_ids_for(list(seq_lens) + ([pad] if pad else [])))
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "num_examples": torch.tensor(num_examples, dtype=torch.long),
            "num_tokens": torch.tensor(num_tokens, dtype=torch.long),
        }
        if self.flash_kwargs:
            ids, _, seq_lens = rows[0]
            seq_lens = list(seq_lens) + ([longest - len(ids)] if longest > len(ids) else [])
            cu = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(seq_lens)
        return batch
