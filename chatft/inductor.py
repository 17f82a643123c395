"""TorchInductor for a training run's decoder layers and its loss (--compile_layers).

On the CPU a LoRA step spends about a quarter of its time in memory-bound elementwise work (norms, rotary
embeddings, SwiGLU, residual adds, dtype casts, the loss's log-softmax) that eager PyTorch runs as one pass over the
activations per operation. Compiled, these passes are fused. What is compiled, and how:

- each decoder layer (the model's `_no_split_modules` classes), with dynamic shapes: packed batches change length
  every step, and a compile per length would cost more than it gains. The attention's per-example split (chatft's
  packed sdpa reads the sequence boundaries) runs eagerly between the compiled parts. Only while gradients are
  recorded: evaluation and sample answers run the layers as they are, without a second compile;
- the loss's log-softmax over each chunk of the LM head's logits (chatft.loss), fused with its casts.

The compile (tens of seconds on a 2-core CPU, less with TorchInductor's on-disk cache warm) is paid in the first
step, so "auto" compiles only runs long enough to win it back (bench/RESULTS.md). A result may differ from an eager
one by its precision's rounding (the fused kernels keep fp32 intermediates where eager rounds to bf16).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MIN_STEPS = 300  # auto: a run of at least this many optimizer steps
MIN_BUDGET_S = 600.0  # or a --time_budget of at least this long (10 minutes)
AUTO_METHODS = ("lora",)  # the fused LoRA function (chatft.fused_lora), measured in bench/RESULTS.md


@dataclass(frozen=True)
class CompileSetting:
    """What a run is, as far as the choice to compile goes."""

    device: str  # "cpu", "cuda", ...
    method: str
    fused_lora: bool
    deepspeed: bool
    checkpointing: bool
    whole_model: bool  # --torch_compile: the Trainer compiles the whole model instead
    steps: int | None  # optimizer steps planned, where known
    budget_s: float | None  # --time_budget in seconds
    compiler: str | None  # the C++ compiler TorchInductor's CPU backend would use


def choose(setting: bool | None, run: CompileSetting) -> tuple[bool, str]:
    """(compile?, why) for --compile_layers `setting` (None: auto)."""
    if setting is not None:
        if setting and run.device == "cpu" and run.compiler is None:
            raise ValueError(
                "--compile_layers: TorchInductor needs a C++ compiler on the CPU (g++ or clang++), and none was "
                "found on PATH: install one, or leave --compile_layers unset"
            )
        return setting, "as asked"
    if run.device != "cpu":
        return False, "auto: on the CPU only"
    if run.method not in AUTO_METHODS or not run.fused_lora:
        return False, "auto: for LoRA with --fused_lora only"
    if run.deepspeed or run.checkpointing or run.whole_model:
        return False, "auto: not with DeepSpeed, activation checkpointing or --torch_compile"
    if run.compiler is None:
        return False, "auto: no C++ compiler (g++ or clang++) for TorchInductor"
    long_run = (run.budget_s is not None and run.budget_s >= MIN_BUDGET_S) or (
        run.budget_s is None and run.steps is not None and run.steps >= MIN_STEPS
    )
    if not long_run:
        return False, (
            f"auto: only for runs of at least {MIN_STEPS} steps or a --time_budget of at least "
            f"{MIN_BUDGET_S / 60:.0f} minutes, where the first step's compile is won back"
        )
    return True, "auto: a long CPU LoRA run"


def cpp_compiler() -> str | None:
    """The C++ compiler on PATH that TorchInductor's CPU backend can use, or None."""
    return next((name for name in ("g++", "c++", "clang++") if shutil.which(name)), None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: every module whose class is one of its `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_layers(model: nn.Module) -> int:
    """Each decoder layer's forward compiled (dynamic shapes) for the steps that record gradients; returns how many
    layers. The modules, their parameters and state dicts are unchanged."""
    # the first layer's input (the embeddings' output) records no gradient, the others' do: compiled too, it would
    # be a second compile (a guard on requires_grad) for one layer of many
    layers = decoder_layers(model)[1:]
    for layer in layers:
        eager = layer.forward
        layer.forward = functools.partial(_while_training, torch.compile(eager, dynamic=True), eager)
    return len(layers)


def _while_training(compiled: Callable, eager: Callable, *args: Any, **kwargs: Any) -> Any:
    return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)


@functools.cache
def compiled_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """sum of cross_entropy(logits in fp32, targets), compiled: the cast, the log-softmax and their backward fused.
    The loss's chunks take a few row counts (chatft.loss.ROW_STEP): compiled for any, once."""
    return torch.compile(summed_cross_entropy, dynamic=True)


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
