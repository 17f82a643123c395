"""Packing: best-fit decreasing rows, restarted positions, isolated attention and honest loss, in the Trainer path.

A tiny Llama (vocab 128, hidden 64, 2 layers) built from a config; examples with hand-made ids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import CHATS as TOY_CHATS
from toy import openai_jsonl, save_tiny_model, tiny_llama
from transformers import LlamaForCausalLM, TrainingArguments

from chatft.collator import PackedCollator, PadCollator
from chatft.packing import (
    PACKED_SDPA,
    PackedDataset,
    PackingError,
    best_fit_decreasing,
    expect_packed,
    register_packed_sdpa,
    rows_per_process,
)
from chatft.training.stages import main
from chatft.training.trainer import ChatTrainer

# transformers' sdpa and eager over packed rows (isolation from the position ids alone), and chatft's packed sdpa
# over a flattened batch (one causal sdpa call per example), which finetune uses for --attn_implementation sdpa
BACKENDS = ["sdpa", "eager", PACKED_SDPA]

X = -100
VOCAB = 128
PAD = 0


def example(n: int, seed: int, prompt: int) -> dict:
    """n random tokens; the first `prompt` are not trained."""
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}


EXAMPLES = [
    example(n, i, p) for i, (n, p) in enumerate([(9, 3), (5, 2), (12, 4), (3, 1), (7, 7 - 2), (6, 0)])
]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tiny_model(attn: str) -> LlamaForCausalLM:
    model = tiny_llama(VOCAB, use_cache=False)
    if attn == PACKED_SDPA:
        register_packed_sdpa()
    model.set_attn_implementation(attn)
    return model


def segments(packed: PackedDataset, batch: dict):
    """(example index, logits row, start) of each example of the packed dataset's rows, in batch order."""
    flat = batch["input_ids"].shape[0] == 1 and len(packed.rows) > 1
    start = 0
    for r, row in enumerate(packed.rows):
        if not flat:
            start = 0
        for j in row:
            yield j, (0 if flat else r), start
            start += len(EXAMPLES[j]["input_ids"])


def trainer_for(model, dataset, collator, tmp_path, batch_size: int, chunked: bool = True) -> ChatTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), per_device_train_batch_size=batch_size, use_cpu=True, report_to=[],
        dataloader_num_workers=0, train_sampling_strategy="sequential", remove_unused_columns=False,
    )  # fmt: skip
    return ChatTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, chunked_loss=chunked
    )


def first_batch(trainer: ChatTrainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def num_items(batch: dict) -> torch.Tensor:
    return (batch["labels"][..., 1:] != X).sum()


# ------------------------------------------------------------------------------------------------- bin packing


def test_best_fit_decreasing_literal():
    # sorted: 7(#1) 6(#3) 5(#0) 4(#4) 3(#2) 2(#5) 1(#6), capacity 10
    # 7 -> new A(3 left); 6 -> new B(4); 5 -> new C(5); 4 -> B (tightest fit, 0 left); 3 -> A (0 left);
    # 2 -> C (3 left); 1 -> C (2 left)
    assert best_fit_decreasing([5, 7, 3, 6, 4, 2, 1], 10) == [[1, 2], [3, 4], [0, 5, 6]]


def test_best_fit_decreasing_keeps_every_example_whole():
    lengths = torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = best_fit_decreasing(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # none dropped, none twice
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 512) + 2  # near the lower bound
    assert bins == best_fit_decreasing(lengths, 512)  # deterministic
    assert best_fit_decreasing([512, 512], 512) == [[0], [1]]
    with pytest.raises(ValueError, match="longer than the row length 8"):
        best_fit_decreasing([3, 9], 8)


def test_a_plan_kept_in_the_cache_entry_is_read_back_not_packed_again(tmp_path, monkeypatch):
    import chatft.packing as packing

    lengths = torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    fresh = best_fit_decreasing(lengths, 512)
    assert packing.packing_plan(lengths, 512, tmp_path) == fresh  # made and kept
    (plan,) = tmp_path.glob("rows_512_*.npy")

    def no_packing(*args):
        raise AssertionError("packed again")

    monkeypatch.setattr(packing, "best_fit_decreasing", no_packing)
    assert packing.packing_plan(lengths, 512, tmp_path) == fresh
    assert PackedDataset([{}] * len(lengths), 512, lengths, tmp_path).rows == fresh
    # other lengths or another capacity: a plan of their own
    monkeypatch.undo()
    other = lengths[::-1]
    assert packing.packing_plan(other, 512, tmp_path) == best_fit_decreasing(other, 512)
    assert packing.packing_plan(lengths, 300, tmp_path) == best_fit_decreasing(lengths, 300)
    assert len(list(tmp_path.glob("rows_*.npy"))) == 3
    # a damaged plan (an example twice, one lost) is made again
    damaged = np.load(plan)
    damaged[-1] = damaged[-2]
    np.save(plan, damaged)
    assert packing.packing_plan(lengths, 512, tmp_path) == fresh
    plan.write_bytes(b"not numpy")
    assert packing.packing_plan(lengths, 512, tmp_path) == fresh
    assert packing.packing_plan([], 512, tmp_path) == []


def test_longest_row_counts_the_tokens_of_the_fullest_row():
    rows = PackedDataset([{}] * 7, 10, [5, 7, 3, 6, 4, 2, 1])  # [[1, 2], [3, 4], [0, 5, 6]]: 10, 10, 8
    assert rows.longest_row == 10
    rows.rows = [[], [0], [6], []]
    assert rows.longest_row == 5
    rows.rows = [[], []]
    assert rows.longest_row == 1


def test_packed_rows_restart_positions_and_never_train_the_first_token():
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    assert packed.rows == [[2, 3], [0, 4], [5, 1]]
    row = packed[1]
    first, second = EXAMPLES[0], EXAMPLES[4]
    assert row["input_ids"] == first["input_ids"] + second["input_ids"]
    assert row["seq_lens"] == [9, 7]
    assert row["labels"] == first["labels"] + [X] + second["labels"][1:]
    row = packed[2]  # an example trained from its first token: that label goes, the rest stays
    assert row["labels"][:6] == [X] + EXAMPLES[5]["labels"][1:]

    batch = PackedCollator(PAD)([packed[0], packed[1]])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [
        [*range(12), *range(3), 0],  # the padding is a segment of its own
        [*range(9), *range(7)],
    ]
    assert batch["input_ids"][0, -1] == PAD and batch["labels"][0, -1] == X
    assert (batch["num_examples"].item(), batch["num_tokens"].item()) == (4, 31)


def test_rows_padded_to_a_fixed_shape_keep_the_padding_a_segment_of_its_own():
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    assert packed.longest_row == 16 == max(len(packed[i]["input_ids"]) for i in range(len(packed)))
    batch = PackedCollator(PAD, pad_to_multiple_of=packed.longest_row)([packed[0]])  # a row of 15
    assert batch["position_ids"].tolist() == [[*range(12), *range(3), 0]]
    assert batch["labels"][0, -1] == X and batch["num_tokens"].item() == 15
    flat = PackedCollator.for_backend(PAD, PACKED_SDPA)
    flat.pad_to_multiple_of = 16
    batch = flat([packed[0], packed[1]])  # 31 tokens -> 32; cu_seqlens hold the padding's segment
    assert batch["input_ids"].shape == (1, 32) and batch["cu_seq_lens_q"].tolist() == [0, 12, 15, 24, 31, 32]


def test_flattened_batch_for_flash_attention_has_no_padding_and_cu_seqlens():
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    batch = PackedCollator.for_backend(PAD, "flash_attention_2")([packed[0], packed[1]])
    assert batch["input_ids"].shape == (1, 31)
    assert batch["position_ids"].tolist() == [[*range(12), *range(3), *range(9), *range(7)]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 12, 15, 24, 31]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_k"] == 12
    flex = PackedCollator.for_backend(PAD, "flex_attention")([packed[0]])
    assert flex["input_ids"].shape == (1, 15) and "cu_seq_lens_q" not in flex
    assert not PackedCollator.for_backend(PAD, "sdpa").flatten


# ------------------------------------------------------------------------------- isolation, in the Trainer path


@pytest.mark.parametrize("attn", BACKENDS)
def test_each_packed_example_sees_only_itself(attn, tmp_path):
    model = tiny_model(attn)
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    collator = PackedCollator.for_backend(PAD, attn)
    trainer = trainer_for(model, packed, collator, tmp_path, batch_size=3, chunked=False)
    batch = first_batch(trainer)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == ((1, 42) if attn == PACKED_SDPA else (3, 16))
    model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        for j, r, start in segments(packed, batch):
            ids = torch.tensor([EXAMPLES[j]["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            got = outputs.logits[r, start : start + ids.shape[1]]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        if attn == PACKED_SDPA:  # it takes its boundaries from the position ids even under an all-ones mask
            return
        # the control: the same batch with a plain 2-D mask lets the second example of a row see the first
        ones = torch.ones_like(batch["input_ids"])
        leaky = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=ones
        ).logits
        assert (leaky[0, 12:15] - outputs.logits[0, 12:15]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_reaching_attention_without_its_boundaries_raises(attn, tmp_path):
    """A 2-D attention mask (all ones) next to the packed position ids: transformers then builds a plain causal
    mask and the examples of a row see each other. The guard stops the step before any loss is computed."""

    class LeakyCollator(PackedCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            return batch | {"attention_mask": torch.ones_like(batch["input_ids"])}

    model = tiny_model(attn)
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    trainer = trainer_for(model, packed, LeakyCollator(PAD), tmp_path, batch_size=3)
    batch = first_batch(trainer)
    with pytest.raises(PackingError, match="3 packed row\\(s\\) of several examples reached LlamaAttention"):
        trainer.compute_loss(model, batch, num_items_in_batch=num_items(batch))


def test_packed_rows_that_never_reach_a_checked_attention_raise():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(PackingError, match="without reaching an attention module"), expect_packed(pos):
        pass  # a model whose attention is no transformers *Attention module: nothing was checked
    with expect_packed(torch.tensor([[0, 1, 2, 3, 4]])):  # one example per row: nothing to check
        pass


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("pad_to", [None, 32])  # 32: the CPU's fixed row shape, padding a segment of its own
def test_packed_loss_and_gradients_equal_the_padded_ones(attn, chunked, pad_to, tmp_path):
    model = tiny_model(attn)
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    collator = PackedCollator.for_backend(PAD, attn)
    collator.pad_to_multiple_of = pad_to
    packed_trainer = trainer_for(model, packed, collator, tmp_path, batch_size=3, chunked=chunked)
    padded_trainer = trainer_for(model, ListDataset(EXAMPLES), PadCollator(PAD), tmp_path, 6, chunked=False)

    def loss_and_grads(trainer):
        batch = first_batch(trainer)
        model.zero_grad()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, batch

    model.train()
    packed_loss, packed_grads, packed_batch = loss_and_grads(packed_trainer)
    padded_loss, padded_grads, padded_batch = loss_and_grads(padded_trainer)
    assert (
        num_items(packed_batch)
        == num_items(padded_batch)
        == sum(sum(1 for t in e["labels"][1:] if t != X) for e in EXAMPLES)
    )
    assert packed_batch["input_ids"].numel() == (
        (42 if attn == PACKED_SDPA else 48) if pad_to is None else (64 if attn == PACKED_SDPA else 96)
    )
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(
    not os.environ.get("CHATFT_TEST_FLEX"), reason="flex attention compiles for ~30 s on the CPU"
)
def test_flattened_flex_attention_isolates(tmp_path):
    model = tiny_model("flex_attention")
    packed = PackedDataset(ListDataset(EXAMPLES), 16, [len(e["input_ids"]) for e in EXAMPLES])
    trainer = trainer_for(
        model, packed, PackedCollator.for_backend(PAD, "flex_attention"), tmp_path, 3, False
    )
    batch = first_batch(trainer)
    assert batch["input_ids"].shape == (1, 42)
    model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        start = 0
        for j in [j for row in packed.rows for j in row]:
            ids = torch.tensor([EXAMPLES[j]["input_ids"]])
            got = outputs.logits[0, start : start + ids.shape[1]]
            torch.testing.assert_close(got, model(input_ids=ids).logits[0], atol=1e-5, rtol=1e-5)
            start += ids.shape[1]


def test_packed_sdpa_leaves_padded_batches_and_generation_to_plain_sdpa():
    model, reference = tiny_model(PACKED_SDPA).eval(), tiny_model("sdpa").eval()
    ids = torch.tensor([[5, 6, 7, 8, PAD, PAD], [9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
        )
        # row 0 restarts its positions at the padding: per-example attention there, the padding its own segment
        pos = torch.tensor([[0, 1, 2, 3, 0, 1], list(range(6))])
        got = model(input_ids=ids, position_ids=pos).logits
        torch.testing.assert_close(got[:, :4], reference(input_ids=ids[:, :4]).logits)
        generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, use_cache=True)
        expected = reference.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, use_cache=True)
    assert generated.tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------------ end to end


CHATS = TOY_CHATS[:6]


@pytest.mark.parametrize(
    "examples,per_row,processes,rows,expected",
    [
        (4, 2.41, 1, 83, 1),  # 1.66 rows: 1 (2.4 examples a step, never more than asked)
        (12, 2.41, 1, 83, 4),  # 4.98: 4
        (12, 2.4, 1, 10, 5),  # exactly 5 rows' worth: 5
        (2, 2.41, 1, 83, 1),  # 0.83: still one row
        (10, 2.4, 2, 10, 2),  # 2.08 rows on each of 2 processes: 2 each
        (8, 2.4, 2, 10, 1),  # 1.67 on each: 1 each
        (64, 2.0, 1, 10, 10),  # more than the data: one step of all rows
        (64, 2.0, 4, 10, 3),  # ... on 4 processes: 3 each (2 empty rows fill the step)
    ],
)
def test_rows_per_process_turns_a_step_of_examples_into_whole_rows(
    examples, per_row, processes, rows, expected
):
    assert rows_per_process(examples, per_row, processes, rows) == expected


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing_e2e")
    save_tiny_model(d / "model")
    data = d / "chats.jsonl"
    data.write_text(openai_jsonl(CHATS))

    def run(out: Path, *extra: str) -> list[dict]:
        argv = [
            "--model_name_or_path", str(d / "model"), "--train_file", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_seq_length", "64", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--preprocessing_cache_dir", str(d / "cache"), "--precision", "fp32", *extra,
        ]  # fmt: skip
        assert main(argv) == 0
        return json.loads((out / "trainer_state.json").read_text())["log_history"]

    return run


def test_packing_is_the_default_and_steps_report_their_examples(toy_run, tmp_path, capsys):
    history = toy_run(tmp_path / "packed", "--method", "lora", "--num_train_epochs", "1")
    out = capsys.readouterr().out
    assert "packing: 6 examples into" in out
    assert "once per example" in out  # --attn_implementation sdpa runs as chatft's packed sdpa
    steps = [e for e in history if "loss" in e]
    assert sum(e["examples_per_step"] for e in steps) == 6  # one epoch sees every example once
    assert (
        "6 examples into 3 rows" in out
        and "a step of 2 examples (batch x accumulation x processes) is 1 " in out
    )
    assert len(steps) == 3  # as many steps as padded batches of 2 examples: a batch counts examples
    final = history[-1]
    assert final["train_examples"] == 6 and final["train_trained_tokens"] > 0

    padded = toy_run(tmp_path / "padded", "--method", "lora", "--num_train_epochs", "1", "--packing", "False")
    assert "sampling group_by_length" in capsys.readouterr().out
    assert [e["examples_per_step"] for e in padded if "loss" in e] == [2, 2, 2]
    assert padded[-1]["train_trained_tokens"] == final["train_trained_tokens"]

    # counted in rows: 3 rows in steps of 2 rows (1 empty row fills the last)
    rows = toy_run(
        tmp_path / "rows", "--method", "lora", "--num_train_epochs", "1", "--packed_batch_unit", "rows"
    )
    assert len([e for e in rows if "loss" in e]) == 2


def test_ptuning_falls_back_to_padding_and_says_so_once(toy_run, tmp_path, capsys):
    toy_run(tmp_path / "pt", "--method", "ptuning", "--pre_seq_len", "4", "--max_steps", "2")
    out = capsys.readouterr().out
    assert out.count("P-Tuning v2 cannot pack") == 1
    assert "activation checkpointing: off" in out


def test_on_the_cpu_rows_get_one_shape_and_freed_memory_goes_back_when_the_heap_grows(
    toy_run, tmp_path, capsys, monkeypatch
):
    import chatft.training.process

    trims, releases = [], []
    resident = iter([100, 105, 120, 118])  # at the end of each of the 2 x 2 micro-batches
    monkeypatch.setattr(chatft.training.process, "glibc_malloc_trim", lambda: lambda: trims.append(1))
    monkeypatch.setattr(chatft.training.process, "resident_bytes", lambda: next(resident))
    monkeypatch.setattr(chatft.training.process, "release_mapped_pages", lambda: releases.append(1))
    monkeypatch.setattr(chatft.training.process.ReleaseDataPages, "every", 0.0)
    two_rows = ["--micro_batch_size", "1", "--packed_batch_unit", "rows"]
    history = toy_run(tmp_path / "a", "--method", "lora", "--max_steps", "2", *two_rows)
    out = capsys.readouterr().out
    assert "rows padded to" in out and "freed memory goes back to the system when the process grows" in out
    assert re.search(r"training starts [0-9.]+ s after the process started", out)
    assert len([e for e in history if "loss" in e]) == 2
    # at the start, then once: 120 is more than 10% past the 100 the first micro-batch needed
    assert len(trims) == 1 + 1
    assert "freed memory handed back after 1 of 4 micro-batches" in out
    assert len(releases) == 2  # the data's mapped pages: after each step, at most every `every` seconds
    trims.clear()
    toy_run(tmp_path / "b", "--method", "lora", "--max_steps", "2", "--malloc_trim", "False")
    assert not trims and "freed memory goes back" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("readings", "trimmed"),
    [
        ([100, 105, 109, 110], []),  # within 10% of the first micro-batch's need: never
        ([100, 111, 104, 108], [2]),  # grown: trimmed; the next one, from a trimmed heap, measures again
        ([100, 120, 130, 140, 150], [2, 5]),  # a larger need, measured after a trim, raises the bar to 143
        ([100, 120, 80, 95], [2]),  # a smaller reading after a trim keeps the need at 100 (95 is no growth)
        ([100, None, 100, None], [2, 4]),  # no reading: trimmed
    ],
)
def test_freed_memory_goes_back_only_when_the_heap_grew_past_the_need(readings, trimmed):
    from chatft.training.process import ReleaseFreedMemory

    trims = []
    policy = ReleaseFreedMemory(
        lambda: trims.append(policy.checks),
        log=lambda _m: None,
        resident=lambda: readings[policy.checks - 1],  # at the end of micro-batch `checks`
    )
    policy.on_train_begin(None, None, None)
    for _ in readings:
        policy.after_micro_batch()
    assert trims == [0, *trimmed]  # (at which micro-batch) the first trim is at the start of training


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only")
def test_the_resident_memory_is_read():
    from chatft.training.process import resident_bytes

    before = resident_bytes()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    assert resident_bytes() - before > 48 * 2**20
    del block


def test_malloc_threshold_is_left_alone_unless_asked(monkeypatch):
    from chatft.training.process import set_malloc_mmap_threshold

    assert not set_malloc_mmap_threshold(0)  # the default: glibc's own behaviour
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not set_malloc_mmap_threshold(1 << 20)  # the environment's choice wins


def test_packed_attention_on_a_gpu_is_flash_varlen_or_masked_sdpa(monkeypatch):
    """No GPU here: the choice alone (CPU: chatft's per-example sdpa, whose host-side boundaries suit the CPU)."""
    import importlib.util

    from chatft.training.trainer import packed_attention

    said = []
    model = tiny_model("sdpa")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert (
        packed_attention(model, "sdpa", said.append, cuda=True) == "sdpa"
        and "block-diagonal mask" in said[-1]
    )
    assert packed_attention(model, "eager", said.append, cuda=True) == "eager"
    assert packed_attention(model, "sdpa", said.append, cuda=False) == PACKED_SDPA
    assert model.config._attn_implementation == PACKED_SDPA


def test_cpu_rows_get_one_shape_when_nearly_full_else_multiples_of_64():
    from chatft.training.step_plan import cpu_row_padding

    assert cpu_row_padding(930, 2, 512)[0] == 512  # 90.8% full: the longest row, one shape
    multiple, why = cpu_row_padding(745, 2, 512)  # 72.8% full: one shape would be 27% padding
    assert multiple == 64 and "at most 8 shapes" in why and "27% padding" in why
    assert "at most 24 shapes" in cpu_row_padding(745, 2, 512, per_forward=3)[1]  # 3 rows flattened a forward
    assert cpu_row_padding(10, 2, 60)[0] == 60  # rows no longer than a step: one shape
    assert cpu_row_padding(0, 0, 1)[0] == 1


def collators_of_a_run(tmp_path, monkeypatch, *extra) -> list:
    """The data collators a one-step LoRA run on the CPU hands the trainer (three long examples, max 140 tokens)."""
    import chatft.training.sft

    collators = []
    real = chatft.training.sft.ChatTrainer

    def trainer(*args, **kwargs):
        collators.append(kwargs["data_collator"])
        return real(*args, **kwargs)

    monkeypatch.setattr(chatft.training.sft, "ChatTrainer", trainer)
    save_tiny_model(tmp_path / "model")
    data = tmp_path / "long.jsonl"
    data.write_text(openai_jsonl([[("user", "hi"), ("assistant", "hello " * n)] for n in (30, 35, 60)]))
    argv = [
        "--model_name_or_path", str(tmp_path / "model"), "--train_file", str(data), "--output_dir",
        str(tmp_path / "out"), "--method", "lora", "--max_steps", "1", "--max_seq_length", "140",
        "--report_to", "none", "--save_strategy", "no", "--precision", "fp32", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return collators


def test_sparse_rows_on_the_cpu_are_padded_to_multiples_of_64(tmp_path, capsys, monkeypatch):
    """Examples too long for two to share a row: each row padded to a multiple of 64, not to the longest."""
    collators = collators_of_a_run(tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "3 examples into 3 rows" in out
    # the step's 3 rows run as one forward, flattened into one row: up to 3 x 13x tokens, at most 7 lengths
    assert re.search(r"rows padded to a multiple of 64 tokens on the CPU \(at most 7 shapes\): padded to the "
                     r"longest row \(13\d\) they would be 2\d% padding", out)  # fmt: skip
    assert collators[0].pad_to_multiple_of == 64


def test_unpacked_batches_on_the_cpu_are_padded_to_multiples_of_64(tmp_path, capsys, monkeypatch):
    """Without packing each batch's longest example sets its length: on the CPU rounded up to a multiple of 64, so
    that a run meets a few shapes, not one per length (bench/RESULTS.md: 1.33x the speed at 0.60x the peak RSS
    over 60 padded AdvertiseGen steps in bf16)."""
    (collator,) = collators_of_a_run(tmp_path, monkeypatch, "--packing", "False")
    assert (
        "padding: batches padded to a multiple of 64 tokens on the CPU (at most 3 shapes"
        in capsys.readouterr().out
    )
    assert collator.pad_to_multiple_of == 64
    batch = collator([{"input_ids": [5] * 70, "labels": [-100] * 60 + [5] * 10}])
    assert batch["input_ids"].shape == (1, 128) and int(batch["attention_mask"].sum()) == 70
    # never past max_seq_length (140, not 192): the padding has positions too, and learned ones may end there
    batch = collator([{"input_ids": [5] * 130, "labels": [-100] * 120 + [5] * 10}])
    assert batch["input_ids"].shape == (1, 140)


def test_packed_attention_runs_in_fp32_on_the_cpu_under_bf16():
    """bf16 sdpa on the CPU keeps kernels per sequence length (RSS grew by 0.9 GiB over an AdvertiseGen run, whose
    examples have hundreds of different lengths) and is slower than fp32: each example's attention runs in fp32, under
    bf16 autocast too, and comes back in bf16 with bf16 gradients."""
    from chatft.packing import _example_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 37, 16, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _example_attention(q, k, v, 0.0, None, 2, None)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    ).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0
