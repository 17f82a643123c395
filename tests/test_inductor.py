"""chatft.inductor (--compile_layers): when a run compiles, and that a compiled run trains as an eager one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import logged_losses, run, tensors
from torch._dynamo.utils import counters
from toy import many_chats, openai_jsonl, save_tiny_model

from chatft.inductor import MIN_BUDGET_S, MIN_STEPS, CompileSetting, choose, cpp_compiler, decoder_layers
from tests.toy import tiny_llama

LONG_LORA = CompileSetting(
    device="cpu", method="lora", fused_lora=True, deepspeed=False, checkpointing=False, whole_model=False,
    steps=MIN_STEPS, budget_s=None, compiler="g++",
)  # fmt: skip


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, True),
        ({"steps": None, "budget_s": MIN_BUDGET_S}, True),
        ({"steps": MIN_STEPS - 1}, False),
        ({"steps": None}, False),  # a stream of unknown length with no step count
        ({"budget_s": MIN_BUDGET_S - 1}, False),  # the budget, not the provisional step count, decides
        ({"device": "cuda"}, False),
        ({"method": "full"}, False),
        ({"method": "qlora"}, False),
        ({"fused_lora": False}, False),
        ({"deepspeed": True}, False),
        ({"checkpointing": True}, False),
        ({"whole_model": True}, False),
        ({"compiler": None}, False),
    ],
)
def test_auto_compiles_long_cpu_lora_runs_only(change, expected):
    on, why = choose(None, dataclasses.replace(LONG_LORA, **change))
    assert on is expected and why.startswith("auto: ")


def test_an_asked_setting_wins_and_an_asked_compile_without_a_compiler_is_a_usage_error():
    short_gpu = dataclasses.replace(LONG_LORA, device="cuda", steps=3)
    assert choose(True, short_gpu) == (True, "as asked")
    assert choose(False, LONG_LORA) == (False, "as asked")
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        choose(True, dataclasses.replace(LONG_LORA, compiler=None))


def test_the_decoder_layers_are_the_models_no_split_modules():
    model = tiny_llama(64, layers=3)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3


@pytest.mark.skipif(cpp_compiler() is None, reason="TorchInductor's CPU backend needs a C++ compiler")
def test_a_compiled_lora_run_logs_the_losses_and_trains_the_weights_of_an_eager_one(tmp_path, capsys):
    """Packed rows of several examples, 5 steps across an epoch boundary (24 chats into 10 rows, 4 rows a step),
    fp32: compiled and eager agree to float rounding, and a short run left to auto stays eager."""
    model = save_tiny_model(tmp_path / "tiny", layers=3)
    data = tmp_path / "many.jsonl"
    data.write_text(openai_jsonl(many_chats(24)))
    common = ["--method", "lora", "--max_steps", "5", "--max_seq_length", "96", "--packed_batch_unit", "rows",
              "--per_device_train_batch_size", "4", "--save_strategy", "no"]  # fmt: skip
    results, graphs = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile_layers"])):
        out = tmp_path / name
        counters.clear()
        assert run(str(model), str(data), out, *common, *extra) == 0
        results[name] = (logged_losses(out), tensors(out / "adapter_model.safetensors"))
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["compiled"] >= 2  # the layers' graphs and the loss's
    log = capsys.readouterr().out
    assert "packing: 24 examples into 10 rows" in log
    assert f"compile: off (auto: only for runs of at least {MIN_STEPS} steps" in log
    assert (
        "compile: 2 decoder layers (all but the first) and the loss, by TorchInductor with dynamic shapes"
        in log
    )
    (losses, weights), (compiled_losses, compiled_weights) = results["eager"], results["compiled"]
    assert sorted(losses) == [1, 2, 3, 4, 5] and len(set(losses.values())) == 5
    assert compiled_losses == pytest.approx(losses, rel=1e-5)
    assert weights.keys() == compiled_weights.keys()
    for k in weights:
        torch.testing.assert_close(compiled_weights[k], weights[k], atol=1e-5, rtol=1e-4)
