"""Padding-free packing: whole examples concatenated into rows of at most max_seq_length tokens.

- Rows are filled best-fit decreasing (longest example first, each into the fullest row it still fits in): no
  example is split, none is dropped, and rows come out ~99 % full on chat data.
- Inside a row, position ids restart at 0 for every example, and the first label of every example is -100, so the
  last token of one example is never trained to predict the first token of the next.
- Isolation (no token attends across an example boundary): the collator passes no attention mask and the forward
  runs without a cache. For sdpa, chatft.training installs PACKED_SDPA below (one causal sdpa call per example); for
  eager and flex attention transformers builds a block-diagonal causal mask from where the position ids restart
  (`masking_utils.find_packed_sequence_indices`), and flash attention gets cu_seqlens from the collator.
  tests/test_packing.py proves it through the Trainer.
- The padding at the end of a short row gets position ids 0, 1, ... too: it is a separate "example" of its own,
  never attended to by the real tokens, with labels -100.

A batch counts examples (`--packed_batch_unit examples`, the default): per_device_train_batch_size x accumulation
x processes examples a step, turned into whole rows per process from the data's examples per row
(`rows_per_process`: never more examples a step than asked, so a packed epoch has at least as many optimizer
steps as a padded one). With `--packed_batch_unit rows` one row counts as one `per_device_train_batch_size` item
(LLaMA-Factory's way): a step then holds several times the examples asked, and an epoch that many times fewer
steps. Either way the Trainer logs `examples_per_step`, so packed and padded runs compare.

Empty rows fill an epoch up to a whole number of optimizer steps (`fill_steps`: batch x accumulation x
processes rows). Without them the last step of an epoch is short, and with several processes accelerate fills it by
repeating the epoch's first rows: those rows would be trained twice, and a run on 2 processes would train
differently from one on a single process. An empty row has no trained token, so it changes neither the loss nor
the gradients, and every split of a step batches the same rows.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import heapq
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch

from chatft.data.templates import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity, best-fit decreasing.

    Deterministic: ties keep the original order. Bins are listed in the order they were opened, each bin's indices
    in the order they were placed (longest first). Each example goes to the bin with the least room that still
    holds it, the oldest of those: bins are kept by their room (a heap of bin ids per room), and the rooms that
    have bins in a sorted list of at most capacity + 1 values, so a placement costs O(log n) however many bins
    are open (a million examples pack in seconds).
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"{len(too_long)} example(s) longer than the row length {capacity} (first: #{too_long[0]}, "
            f"{lengths[too_long[0]]} tokens); truncate to max_seq_length before packing"
        )
    # longest first; stable: equal lengths keep file order
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room -> heap of the ids of the bins with that much room
    rooms: list[int] = []  # the rooms in by_room, ascending

    def put(b: int, room: int) -> None:
        heap = by_room.get(room)
        if heap is None:
            by_room[room] = [b]
            bisect.insort(rooms, room)
        else:
            heapq.heappush(heap, b)

    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, n)
        if at == len(rooms):
            bins.append([i])
            put(len(bins) - 1, capacity - n)
            continue
        room = rooms[at]
        heap = by_room[room]
        b = heapq.heappop(heap)
        if not heap:
            del by_room[room]
            del rooms[at]
        bins[b].append(i)
        put(b, room - n)
    return bins


def packing_plan(lengths: Sequence[int], capacity: int, folder: str | os.PathLike | None) -> list[list[int]]:
    """best_fit_decreasing(lengths, capacity), kept in folder (the data's cache entry) when one is given, named by
    the capacity and a digest of the lengths: a run on cached data packs a million examples in milliseconds instead
    of seconds, into the same rows. A damaged plan, or one that is no packing of the lengths, is made again."""
    if folder is None:
        return best_fit_decreasing(lengths, capacity)
    digest = hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]
    file = Path(folder) / f"rows_{capacity}_{digest}.npy"
    try:
        rows = _unpack_plan(np.load(file), lengths, capacity)
    except (OSError, ValueError):
        rows = None
    if rows is None:
        rows = best_fit_decreasing(lengths, capacity)
        sizes = [len(row) for row in rows]
        plan = np.concatenate([[len(rows)], sizes, list(itertools.chain.from_iterable(rows))]).astype(
            np.int64
        )
        with contextlib.suppress(OSError):  # a cache folder this process may not write: packed each run
            temporary = file.with_name(f".{file.name}.{os.getpid()}.npy")
            np.save(temporary, plan)
            os.replace(temporary, file)
    return rows


def _unpack_plan(plan: np.ndarray, lengths: Sequence[int], capacity: int) -> list[list[int]] | None:
    """The rows of a saved plan ([rows, each row's size, the indices row by row]), or None when they are not a
    packing of `lengths` into `capacity`."""
    if plan.ndim != 1 or len(plan) < 1 or len(plan) != 1 + int(plan[0]) + len(lengths):
        return None
    sizes, flat = plan[1 : 1 + int(plan[0])], plan[1 + int(plan[0]) :]
    if (sizes < 0).any() or int(sizes.sum()) != len(lengths):
        return None
    if len(flat) and (flat.min() < 0 or np.bincount(flat, minlength=len(lengths)).max() != 1):
        return None  # every example exactly once
    if _row_tokens(flat, sizes, lengths).max(initial=0) > capacity:
        return None
    indices = flat.tolist()
    ends = np.cumsum(sizes).tolist()
    return [indices[end - size : end] for end, size in zip(ends, sizes.tolist(), strict=True)]


def _row_tokens(flat: np.ndarray, sizes: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """The tokens of each row that holds examples: rows of these sizes, their indices into lengths one after the
    other in flat."""
    if not len(flat):
        return np.zeros(0, dtype=np.int64)
    filled = sizes[sizes > 0]
    starts = np.concatenate([[0], np.cumsum(filled)[:-1]]).astype(np.int64)
    return np.add.reduceat(np.asarray(lengths, dtype=np.int64)[flat], starts)


def rows_per_process(examples_per_step: int, examples_per_row: float, processes: int, rows: int) -> int:
    """Packed rows each of `processes` puts in an optimizer step of `examples_per_step` examples: the most whole
    rows that hold no more examples than that on average, so that packing never gives an epoch fewer optimizer
    steps than padded batches would; at least one row, at most what makes one step of all `rows`."""
    most = math.floor(examples_per_step / (examples_per_row * processes) + 1e-9)
    return max(1, min(most, -(-rows // processes)))


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed examples over a dataset of {input_ids, labels}; built lazily, one row per item."""

    def __init__(
        self,
        examples,
        max_seq_length: int,
        lengths: Sequence[int] | None = None,
        plan_dir: str | os.PathLike | None = None,
    ) -> None:
        """plan_dir: the data's cache entry, where the rows are kept (packing_plan)."""
        self.examples = (
            examples.select_columns(["input_ids", "labels"])
            if hasattr(examples, "select_columns")
            else examples
        )
        if lengths is None:
            lengths = [len(ids) for ids in self.examples["input_ids"]]
        self.lengths = list(lengths)
        self.max_seq_length = max_seq_length
        self.rows = packing_plan(self.lengths, max_seq_length, plan_dir)

    def fill_steps(self, rows_per_step: int) -> None:
        """Empty rows up to a whole number of steps of rows_per_step rows (see the top)."""
        self.rows += [[] for _ in range(-len(self.rows) % max(1, rows_per_step))]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def packed_rows(self) -> int:
        """Rows holding examples (not the empty ones that fill the last step)."""
        return sum(1 for row in self.rows if row)

    @property
    def examples_per_row(self) -> float:
        rows = self.packed_rows
        return len(self.lengths) / rows if rows else 0.0

    @property
    def longest_row(self) -> int:
        """Tokens in the longest row (at least 1)."""
        sizes = np.fromiter(map(len, self.rows), dtype=np.int64, count=len(self.rows))
        flat = np.fromiter(itertools.chain.from_iterable(self.rows), dtype=np.int64, count=int(sizes.sum()))
        return max(1, int(_row_tokens(flat, sizes, self.lengths).max(initial=0)))

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return packed_row(self.examples[j] for j in self.rows[i])

    def summary(self) -> str:
        """One line: examples, rows, fill, examples per row."""
        tokens = sum(self.lengths)
        rows = self.packed_rows
        fill = tokens / (rows * self.max_seq_length) if rows else 0.0
        per_row = self.examples_per_row
        empty = len(self.rows) - rows
        filled = f"; {empty} empty row(s) complete the last step of an epoch" if empty else ""
        return (
            f"packing: {len(self.lengths)} examples into {rows} rows of <= {self.max_seq_length} tokens "
            f"({per_row:.2f} examples per row, rows {100 * fill:.1f}% full){filled}"
        )


def packed_row(examples: Iterable[dict]) -> dict[str, list[int]]:
    """One row of examples ({input_ids, labels}) as the collator takes it: concatenated, with each example's
    length (seq_lens); each example's first label is IGNORE_INDEX: never predicted from the previous one's last
    token."""
    input_ids: list[int] = []
    labels: list[int] = []
    seq_lens: list[int] = []
    for example in examples:
        ids, lab = list(example["input_ids"]), list(example["labels"])
        lab[0] = IGNORE_INDEX
        input_ids += ids
        labels += lab
        seq_lens.append(len(ids))
    return {"input_ids": input_ids, "labels": labels, "seq_lens": seq_lens}


def position_ids_for(seq_lens: Sequence[int]) -> list[int]:
    return [p for n in seq_lens for p in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# attention per example on the CPU (and any device without flash attention)

PACKED_SDPA = "chatft_packed_sdpa"


# compiled decoder layers (chatft.inductor) run this eagerly: traced, its per-example split would be unrolled into
# the graph and recompiled for every count of examples a row holds
@torch.compiler.disable
def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """torch sdpa run once per example of a packed batch, each causal over its own tokens only.

    The block-diagonal mask of a packed row makes plain sdpa compute (and, on the CPU, store) the attention of
    every token with every other of the row, and keeps it off its causal fast path; here each example is its own
    `is_causal=True` call, so attention costs sum(n_i^2) instead of L^2. The boundaries come from cu_seq_lens_q
    (a flattened batch, as for flash attention) or else from where position_ids restart at 0. A sliding window
    (Mistral, Gemma-3, Qwen2's sliding layers: a token sees itself and the window - 1 before it) is honoured for
    examples longer than it. Attention-logit soft-capping (Gemma-2, which transformers runs in eager attention
    only) is refused. Anything else (a padding mask, a KV cache, one example per row) goes to transformers' own
    sdpa unchanged.
    """
    if softcap is not None:
        raise PackingError(
            f"{type(module).__name__} soft-caps its attention logits, which sdpa cannot: use --attn_implementation eager"
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    bounds = None
    if attention_mask is None and q_len > 1 and key.shape[2] == q_len:
        bounds = _segment_bounds(cu_seq_lens_q, position_ids, query.shape[0], q_len)
    if bounds is None:
        window = {} if sliding_window is None else {"sliding_window": sliding_window}
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **window,
            **kwargs,
        )
    groups = getattr(module, "num_key_value_groups", 1)
    dropout = dropout if module.training else 0.0
    rows = []
    for b, row_bounds in enumerate(bounds):
        parts = [
            _example_attention(
                query[b : b + 1, :, start:stop],
                key[b : b + 1, :, start:stop],
                value[b : b + 1, :, start:stop],
                dropout,
                scaling,
                groups,
                sliding_window,
            )
            for start, stop in row_bounds
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _example_attention(q, k, v, dropout: float, scaling, groups: int, window: int | None) -> torch.Tensor:
    """Causal attention of one example: sdpa's causal fast path, or an explicit mask where the example is longer
    than the sliding window. On the CPU a bf16/fp16 example runs in fp32 (out of autocast): torch's bf16 CPU
    kernel keeps code and buffers for every sequence length it has seen (an AdvertiseGen run, whose examples have
    hundreds of lengths, grew by 0.9 GiB and its steps slowed by a quarter over 200 steps), and it is slower
    than fp32 at every length (bench/RESULTS.md)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = _example_attention(q.float(), k.float(), v.float(), dropout, scaling, groups, window)
        return out.to(q.dtype)
    n = q.shape[2]
    if window is None or n <= window:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=groups > 1
        )
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
    )


def _segment_bounds(cu_seq_lens, position_ids, batch: int, length: int) -> list[list[tuple[int, int]]] | None:
    """[(start, stop), ...] per row, or None when no row holds more than one sequence."""
    if cu_seq_lens is not None and batch == 1:
        cu = cu_seq_lens.tolist()
        if cu[-1] == length:
            return [list(zip(cu[:-1], cu[1:], strict=True))]
    if position_ids is None:
        return None
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = pos == 0
    if not bool(starts[:, 1:].any()):
        return None
    out = []
    for row in starts:
        idx = torch.nonzero(row).flatten().tolist()
        if not idx or idx[0] != 0:
            idx = [0, *idx]
        out.append(list(zip(idx, [*idx[1:], length], strict=True)))
    return out


def _packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding mask (packed batches: the boundaries are handled per example);
    transformers' own sdpa mask otherwise (padded batches, generation)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_sdpa() -> str:
    """Make PACKED_SDPA a valid attn_implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    return PACKED_SDPA


# ----------------------------------------------------------------------------------------------------------------
# the isolation guard: a packed row that reaches attention without its example boundaries raises


class PackingError(RuntimeError):
    """A packed row would attend across its examples."""


_EXPECTED: ContextVar[dict | None] = ContextVar("chatft_packed_rows", default=None)


def install_isolation_guard(model: torch.nn.Module) -> int:
    """Hook every attention module of model (transformers' *Attention classes) to check, inside expect_packed,
    that it gets the boundaries of the packed examples; returns how many modules were hooked."""
    hooked = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and not getattr(module, "_chatft_guarded", False):
            module.register_forward_pre_hook(_check_isolation, with_kwargs=True)
            module._chatft_guarded = True
            hooked += 1
    return hooked


@contextmanager
def expect_packed(position_ids: torch.Tensor | None) -> Iterator[None]:
    """Within: a forward over these rows, whose positions restart at every example. Every attention call must
    isolate the examples (cu_seq_lens, a block-diagonal mask, or chatft's packed sdpa with the position ids), and
    at least one must happen; else PackingError, before any loss is computed from it."""
    starts = _segment_starts(position_ids)
    if not any(starts):
        yield
        return
    state = {"starts": starts, "calls": 0}
    token = _EXPECTED.set(state)
    try:
        yield
    finally:
        _EXPECTED.reset(token)
    if state["calls"] == 0:
        raise PackingError(
            "packed rows went through the model without reaching an attention module chatft can check (its "
            "attention is not a transformers *Attention module), so nothing shows the examples were kept apart; "
            "train this model with --packing False"
        )


def _segment_starts(position_ids: torch.Tensor | None) -> list[list[int]]:
    """Per row, the indices (after the first) where an example starts."""
    if position_ids is None or position_ids.dim() != 2:
        return []
    return [torch.nonzero(row[1:] == 0).flatten().add(1).tolist() for row in position_ids]


@torch.compiler.disable  # as packed_sdpa_attention_forward: the boundaries are Python lists
def _check_isolation(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state = _EXPECTED.get()
    if state is None:
        return
    state["calls"] += 1
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if kwargs.get("cu_seq_lens_q") is not None:
        return
    if (
        mask is None
        and impl == PACKED_SDPA
        and _segment_starts(kwargs.get("position_ids")) == state["starts"]
    ):
        return
    if mask is not None and _mask_blocks(mask, state["starts"]):
        return
    rows = sum(1 for s in state["starts"] if s)
    raise PackingError(
        f"{rows} packed row(s) of several examples reached {type(module).__name__} ({impl} attention) without "
        "the examples' boundaries (no cu_seq_lens, no block-diagonal mask, no restarting position ids): it would "
        "attend across examples and train on the wrong context; train this model with --packing False, or with "
        "--attn_implementation sdpa or eager"
    )


def _mask_blocks(mask, starts: list[list[int]]) -> bool:
    """Whether the mask keeps the first token of every example from seeing the last one of the example before."""
    if hasattr(mask, "mask_mod"):  # flex attention's BlockMask
        checks = [(b, s) for b, row in enumerate(starts) for s in row]
        return all(not bool(mask.mask_mod(*(torch.tensor(x) for x in (b, 0, s, s - 1)))) for b, s in checks)
    if not torch.is_tensor(mask) or mask.dim() != 4:
        return False
    for b, row in enumerate(starts):
        for s in row:
            value = mask[min(b, mask.shape[0] - 1), 0, s, s - 1]
            blocked = not bool(value) if mask.dtype == torch.bool else bool(value < -1e4)
            if not blocked:
                return False
    return True
