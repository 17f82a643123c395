"""Precision and micro-batches chosen from the machine (chatft.machine), and what training does with them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from toy import many_chats, openai_jsonl, save_tiny_model

from chatft import machine
from chatft.machine import GIB, Shape, choose_precision, plan_step, precision_flags
from chatft.training.command_line import parse_args
from chatft.training.stages import main

SMOLLM2 = Shape(hidden=576, intermediate=1536, layers=30, vocab=49152)


def probe(speedup: float):
    return lambda _shape: speedup


def test_precision_auto_follows_the_probe_where_the_cpu_has_no_flags(tmp_path):
    def auto(speedup: float, shape=SMOLLM2, deepspeed=False):  # a machine without flags, a fresh probe cache
        cache = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        return choose_precision("auto", shape, False, deepspeed, probe(speedup), None, cache)

    assert auto(4.4) == (
        "bf16",
        "auto: this CPU multiplies in bf16 4.4x as fast as in fp32 (a 512x576 @ 576x1536 product)",
    )
    precision, why = auto(0.3)
    assert precision == "fp32" and "bf16 runs at 0.30x the speed of fp32" in why
    assert auto(1.1)[0] == "fp32"  # not worth its rounding
    assert auto(4.4, deepspeed=True)[0] == "fp32"  # DeepSpeed on the CPU
    assert auto(4.4, shape=None)[0] == "fp32"  # no shape, no probe
    assert choose_precision("fp32", SMOLLM2, False, False, probe(4.4)) == ("fp32", "--precision")
    assert precision_flags("bf16", cuda=False) == ["--bf16", "True", "--use_cpu", "True"]
    assert precision_flags("bf16", cuda=True) == ["--bf16", "True"] and precision_flags("fp32", False) == []


def test_the_probe_measures_this_machine():
    speedup = machine.probe_bf16_speedup(Shape(64, 128, 2, 100), reps=2)
    assert 0 < speedup < 100


class TimedProducts(TorchFunctionMode):
    """Records the dtypes of every matrix product and moves a fake clock on by a product's cost: 2 in fp32, 1 in
    bf16 (a CPU with bf16 instructions)."""

    COST = {torch.float32: 2.0, torch.bfloat16: 1.0}

    def __init__(self):
        super().__init__()
        self.now, self.products = 0.0, []

    def clock(self) -> float:
        return self.now

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "mm"):
            dtypes = tuple(a.dtype for a in args)
            self.products.append(dtypes)
            self.now += self.COST[dtypes[0]]
        return func(*args, **(kwargs or {}))


def test_the_probe_times_a_bf16_product_against_an_fp32_one(monkeypatch):
    timed = TimedProducts()
    monkeypatch.setattr(machine, "time", SimpleNamespace(perf_counter=timed.clock))
    with timed:
        speedup = machine.probe_bf16_speedup(Shape(64, 128, 2, 100), reps=3)
    fp32, bf16 = (torch.float32,) * 2, (torch.bfloat16,) * 2
    assert set(timed.products) == {fp32, bf16}
    assert timed.products.count(fp32) == timed.products.count(bf16) >= 3  # reps of each, timed alike
    assert speedup == 2.0  # fp32's time over bf16's


def test_parse_args_sets_the_trainers_precision(monkeypatch, tmp_path):
    save_tiny_model(tmp_path / "m")
    common = ["--train_file", "x.json", "--model_name_or_path", str(tmp_path / "m")]
    monkeypatch.setattr(machine, "cpu_bf16_instructions", lambda cpuinfo=None: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, args = parse_args(common)
    assert (args.precision, args.bf16, args.use_cpu) == (
        "bf16",
        True,
        True,
    ) and args.precision_why.startswith("auto")
    monkeypatch.setattr(machine, "cpu_bf16_instructions", lambda cpuinfo=None: False)
    _, _, args = parse_args(common)
    assert (args.precision, args.bf16) == ("fp32", False)
    _, _, args = parse_args([*common, "--bf16", "True", "--use_cpu", "True"])
    assert (args.precision, args.precision_why) == ("bf16", "--bf16")
    with pytest.raises(ValueError, match="--precision fp32 contradicts --bf16"):
        parse_args([*common, "--precision", "fp32", "--bf16", "True", "--use_cpu", "True"])


def test_step_plan_on_the_cpu_holds_2048_tokens_a_forward_within_half_the_free_memory():
    def cpu(batch: int, row_tokens: int, available: int = 64 * GIB):
        return plan_step(
            batch, row_tokens, SMOLLM2, "lora", True, False, None, None, True, available=available
        )

    plan = cpu(4, 512)
    assert (plan.micro_batch, plan.checkpointing) == (4, False)
    assert "up to 2048 tokens per forward" in plan.why
    assert cpu(8, 2048).micro_batch == 1
    assert cpu(16, 128).micro_batch == 16
    assert cpu(12, 256).micro_batch == 6  # 8 rows of 256 would hold 2048 tokens: a divisor of 12
    row, fixed = SMOLLM2.activation_bytes(512, half=True), SMOLLM2.fixed_bytes("lora", half=True)
    assert (
        cpu(4, 512, available=int(2 * (fixed + 2.5 * row))).micro_batch == 2
    )  # half the free memory: 2 rows
    given = plan_step(4, 512, SMOLLM2, "lora", True, False, None, 2, False)
    assert (given.micro_batch, given.checkpointing) == (2, None)


def test_step_plan_within_a_memory_budget_and_checkpointing_only_where_a_row_does_not_fit():
    row = SMOLLM2.activation_bytes(512, half=False)
    fixed = SMOLLM2.fixed_bytes("lora", half=False)
    budget = (fixed + 2.5 * row) / GIB
    plan = plan_step(4, 512, SMOLLM2, "lora", False, False, budget, None, True)
    assert (plan.micro_batch, plan.checkpointing) == (2, False)
    gpu = plan_step(
        16, 512, SMOLLM2, "lora", False, True, None, None, True, available=int(fixed + 9.5 * row / 0.9)
    )
    assert gpu.micro_batch == 8 and "90% of the GPU's memory" in gpu.why
    tight = plan_step(4, 512, SMOLLM2, "full", False, False, (SMOLLM2.fixed_bytes("full", False) + row / 2) / GIB,
                      None, True)  # fmt: skip
    assert (tight.micro_batch, tight.checkpointing) == (1, True) and "not even one row" in tight.why
    assert plan_step(4, 512, SMOLLM2, "full", False, False, 0.001, None, False).checkpointing is None  # asked


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    save_tiny_model(d / "model")
    (d / "data.jsonl").write_text(openai_jsonl(many_chats(24)))
    return d


def train(setup, out: Path, capsys, *extra: str) -> tuple[dict, dict, str]:
    """A step of 10 examples: 4 packed rows (24 examples in 10 rows), 3 steps an epoch."""
    argv = ["--model_name_or_path", str(setup / "model"), "--train_file", str(setup / "data.jsonl"),
            "--output_dir", str(out), "--method", "full", "--max_steps", "4", "--max_seq_length", "96",
            "--per_device_train_batch_size", "10", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--precision", "fp32", *extra]  # fmt: skip
    assert main(argv) == 0
    log = capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    return losses, load_file(str(out / "model.safetensors")), log


def test_a_step_split_into_micro_batches_trains_as_the_whole_step(setup, tmp_path, capsys):
    whole, whole_weights, log = train(setup, tmp_path / "whole", capsys)
    assert "micro-batches: none, a step's 4 rows in one forward pass" in log
    split, split_weights, log = train(setup, tmp_path / "split", capsys, "--micro_batch_size", "1")
    assert "a step's 4 rows per process run as 4 forward passes of 1" in log
    budget, budget_weights, log = train(setup, tmp_path / "budget", capsys, "--max_memory", "0.0002")
    assert "run as 2 forward passes of 2" in log or "run as 4 forward passes of 1" in log
    assert len(set(whole.values())) == 4
    for losses, weights in ((split, split_weights), (budget, budget_weights)):
        assert losses == pytest.approx(whole, abs=1e-5)
        for k in whole_weights:
            torch.testing.assert_close(weights[k], whole_weights[k], atol=1e-5, rtol=1e-4)


def test_checkpointing_left_to_chatft_only_when_unset_and_never_for_ptuning(tmp_path):
    from chatft.args import DataArguments, ModelArguments
    from chatft.training.arguments import TrainArguments
    from chatft.training.step_plan import plan_micro_batches

    explicit = TrainArguments(output_dir=str(tmp_path / "o"), activation_checkpointing=False, report_to=[])
    assert not explicit.checkpointing_auto
    save_tiny_model(tmp_path / "m")
    said: list[str] = []
    for method, expected in (("full", True), ("ptuning", False)):
        args = TrainArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, report_to=[],
                              max_memory=1e-6)  # fmt: skip
        args.precision = "fp32"
        plan_micro_batches(
            ModelArguments(str(tmp_path / "m"), method=method), DataArguments(), args, said.append
        )
        assert args.activation_checkpointing is expected and args.per_device_train_batch_size == 1
    assert said[-1] == "activation checkpointing: would be needed, but P-Tuning v2 cannot use it"
