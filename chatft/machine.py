"""What the machine decides: the training precision (from the CPU's instructions, or the GPU) and how a
step is split into micro-batches (from the memory a micro-batch needs, estimated from the model's shape).

Precision (--precision auto, the default):
- CUDA: bf16 where the GPU supports it, else fp16 (with the Trainer's loss scaling); fp32 master weights.
- CPU: bf16 autocast where the CPU has bf16 matrix instructions (x86 AMX-BF16 or AVX512-BF16, Arm BF16: its
  /proc/cpuinfo flags say so), else fp32: without them bf16 is emulated and several times slower. A timing probe
  decides only where there is no flag list to read (not Linux): medians of interleaved repeats, kept per machine
  in ~/.cache/chatft/precision.json so that the same command chooses the same precision busy or idle (a single
  timing on a busy machine is noise: three identical runs once chose fp32, bf16 and bf16). Under DeepSpeed on
  the CPU, fp32. A resumed run keeps the precision it started in (chatft.training.command_line).
- --precision fp32|bf16|fp16, --bf16 or --fp16 decide instead.

Micro-batches (--micro_batch_size auto, the default): --per_device_train_batch_size stays what a process puts in
one optimizer step; the step runs as micro-batches (gradient accumulation, which trains exactly the same: the
loss is normalised over the whole step). Their size:
- on a GPU, the largest that fits the memory budget (--max_memory GiB, else 90% of the GPU's memory);
- on the CPU, the smallest that holds MICRO_TOKENS_CPU tokens (bench/RESULTS.md: up to about that many tokens a
  forward, a CPU trains faster per token, since a forward's fixed costs are shared by more tokens; beyond it,
  slower again), within half the free memory, or within --max_memory when given.
Activation checkpointing (unset: auto) is turned on only where one micro-batch of one row does not fit the budget.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_MIN_SPEEDUP = 1.2  # bf16 only where the probe multiplies at least this much faster than fp32
MICRO_TOKENS_CPU = 2048  # tokens per forward up to which a CPU trains faster per token (bench/RESULTS.md)
CPU_BUDGET_SHARE = 0.5  # of the free memory, for a CPU micro-batch chosen without --max_memory
GPU_BUDGET_SHARE = 0.9
GIB = 2**30
PROBE_CACHE = Path("~/.cache/chatft/precision.json").expanduser()


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, model_path: str) -> Shape | None:
        """The model's shape from its config.json; None when it cannot be read."""
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path)
            config = getattr(config, "text_config", None) or config
            return cls(
                config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
            )
        except (OSError, ValueError, AttributeError, TypeError):
            return None

    @property
    def parameters(self) -> int:
        return (
            self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.intermediate)
            + self.vocab * self.hidden
        )

    def activation_bytes(self, tokens: int, half: bool) -> int:
        """What the backward keeps per micro-batch: per token and layer about 10 hidden-sized and 7.5
        intermediate-sized values (fitted to SmolLM2-135M's measured peak RSS, bench/RESULTS.md)."""
        per_token = self.layers * (10 * self.hidden + 7.5 * self.intermediate)
        return int(tokens * per_token * (2 if half else 4))

    def fixed_bytes(self, method: str, half: bool) -> int:
        """Weights, gradients and optimizer state: 16 bytes a parameter for full fine-tuning (fp32 weights, grads,
        two Adam moments), the frozen base alone (bf16 or fp32) for LoRA and P-Tuning, ~0.6 for a 4-bit one."""
        per_param = {"full": 16, "qlora": 0.6}.get(method, 2 if half else 4)
        return int(self.parameters * per_param)


# ---------------------------------------------------------------------------------------------------- precision


def cpu_bf16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU multiplies bf16 in hardware, from /proc/cpuinfo's flags (x86: amx_bf16, avx512_bf16) or
    Features (Arm: bf16); None where there is no such list to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    return None


def probe_bf16_speedup(shape: Shape, reps: int = 7) -> float:
    """How many times faster the CPU multiplies a [512, hidden] by a [hidden, intermediate] matrix in bf16 than
    in fp32: the median of reps interleaved pairs of timings (after a warm-up), so that a burst of other work
    slows both sides of a pair alike."""
    a = torch.randn(512, shape.hidden)
    b = torch.randn(shape.hidden, shape.intermediate)
    a16, b16 = a.bfloat16(), b.bfloat16()
    a @ b, a16 @ b16  # warm-up
    ratios = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        middle = time.perf_counter()
        a16 @ b16
        ratios.append((middle - start) / max(time.perf_counter() - middle, 1e-9))
    return statistics.median(ratios)


def cached_probe(shape: Shape, cache: Path = PROBE_CACHE, probe=None) -> tuple[float, bool]:
    """(bf16 speedup, whether it came from the cache): probed once per machine, CPU model, torch version and
    matrix shape, and kept in cache."""
    key = f"{platform.machine()} {platform.processor()} {os.cpu_count()} torch {torch.__version__} {shape.hidden}x{shape.intermediate}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), int | float):
        return float(known[key]), True
    speedup = (probe or probe_bf16_speedup)(shape)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps((known if isinstance(known, dict) else {}) | {key: speedup}, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return speedup, False


def choose_precision(
    requested: str,
    shape: Shape | None,
    cuda: bool,
    deepspeed: bool,
    probe=None,
    bf16_instructions: bool | None | str = "read",
    cache: Path = PROBE_CACHE,
) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for --precision requested (auto decides from the machine). bf16_instructions:
    "read" reads /proc/cpuinfo (cpu_bf16_instructions); None means there is no flag list, so a probe decides."""
    if requested != "auto":
        return requested, "--precision"
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16; fp16 with loss scaling"
    if deepspeed:
        return "fp32", "auto: DeepSpeed on the CPU trains in fp32"
    if bf16_instructions == "read":
        bf16_instructions = cpu_bf16_instructions()
    if bf16_instructions is True:
        return "bf16", "auto: this CPU has bf16 matrix instructions (AMX-BF16 / AVX512-BF16 / Arm BF16)"
    if bf16_instructions is False:
        return "fp32", "auto: this CPU has no bf16 matrix instructions (bf16 would be emulated, and slow)"
    if shape is None:
        return "fp32", "auto: no CPU flags to read and the model's shape is unknown, so no probe"
    speedup, cached = cached_probe(shape, cache, probe)
    probe_text = f"a {512}x{shape.hidden} @ {shape.hidden}x{shape.intermediate} product"
    probe_text += ", kept from an earlier probe" if cached else ""
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"auto: this CPU multiplies in bf16 {speedup:.1f}x as fast as in fp32 ({probe_text})"
    return (
        "fp32",
        f"auto: bf16 runs at {speedup:.2f}x the speed of fp32 on this CPU ({probe_text}); fp32 it is",
    )


def precision_flags(precision: str, cuda: bool) -> list[str]:
    """The Trainer arguments for a precision (the Trainer refuses bf16 on the CPU without --use_cpu)."""
    if precision == "bf16":
        return ["--bf16", "True"] + ([] if cuda else ["--use_cpu", "True"])
    if precision == "fp16":
        return ["--fp16", "True"]
    return []


# ---------------------------------------------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes: the current GPU's total memory, else the machine's MemAvailable."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return free_host_memory()


def free_host_memory() -> int | None:
    """Bytes: the machine's MemAvailable (/proc/meminfo), else sysconf's available pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class StepPlan:
    micro_batch: int  # rows (packed) or examples per forward
    checkpointing: bool | None  # None: leave as asked
    why: str


def plan_step(
    batch: int,
    row_tokens: int,
    shape: Shape | None,
    method: str,
    half: bool,
    cuda: bool,
    max_memory_gib: float | None,
    micro_batch: int | None,
    checkpointing_auto: bool,
    available: int | None = None,
) -> StepPlan:
    """How a step of `batch` rows of up to row_tokens tokens runs: micro-batch size (a divisor of batch) and,
    where checkpointing is left to chatft, whether it is needed."""
    if micro_batch is not None:  # given: taken as it is (a divisor of the batch)
        return StepPlan(_divisor_at_most(batch, micro_batch), None, f"--micro_batch_size {micro_batch}")
    if shape is None:
        return StepPlan(
            batch, False if checkpointing_auto else None, "the model's shape is unknown: no split"
        )
    if max_memory_gib is not None:
        budget, of = int(max_memory_gib * GIB), f"--max_memory {max_memory_gib:g} GiB"
    elif cuda:
        available = available if available is not None else available_memory()
        budget, of = int(GPU_BUDGET_SHARE * (available or 0)), f"{GPU_BUDGET_SHARE:.0%} of the GPU's memory"
    else:
        budget, of = None, ""
    fixed = shape.fixed_bytes(method, half)
    row = shape.activation_bytes(row_tokens, half)
    if budget is None:  # the CPU without a budget: the fewest rows that hold MICRO_TOKENS_CPU tokens
        wanted = max(1, -(-MICRO_TOKENS_CPU // row_tokens))
        available = available if available is not None else free_host_memory()
        if available:  # and no more than half the memory the machine has free
            wanted = min(wanted, max(1, _rows_that_fit(int(CPU_BUDGET_SHARE * available), fixed, row)))
        micro = _divisor_at_most(batch, wanted)
        why = (
            f"on the CPU, up to {micro * row_tokens} tokens per forward (~{row * micro / GIB:.1f} GiB of "
            f"activations): a forward's fixed costs are shared by more tokens, so fewer, longer forwards train "
            f"faster up to about {MICRO_TOKENS_CPU} tokens"
        )
        return StepPlan(micro, False if checkpointing_auto else None, why)
    fits = _rows_that_fit(budget, fixed, row)
    if fits >= 1:
        micro = _divisor_at_most(batch, fits)
        why = f"{micro} row(s) of ~{row / GIB:.2f} GiB of activations each fit {of} beside ~{fixed / GIB:.1f} GiB"
        return StepPlan(micro, False if checkpointing_auto else None, why)
    why = f"not even one row (~{row / GIB:.2f} GiB of activations) fits {of} beside ~{fixed / GIB:.1f} GiB"
    return StepPlan(
        1,
        True if checkpointing_auto else None,
        why + (": activation checkpointing" if checkpointing_auto else ""),
    )


def _rows_that_fit(budget: int, fixed: int, row: int) -> int:
    """How many rows of `row` bytes of activations fit a budget beside `fixed` bytes (0 where none does)."""
    return max(0, (budget - fixed) // max(row, 1))


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)
