"""Training throughput and memory: padded, length-grouped and packed runs of the same real data, side by side.

Each variant is one real `finetune` run (chatft.training.stages.main, the same code path as the command line) for a fixed
number of steps, in its own subprocess, so that its peak RSS is its own (os.wait4). Printed per variant:
trained tokens/s (label != -100), non-pad tokens/s, padding share, examples per step, peak RSS, final loss (mean
of the last 5 steps) and the loss on a held-out set evaluated at the last step; then ratios against the padded
baseline (file order, the model's own loss, no checkpointing: what a plain Trainer script does).

    python bench/throughput.py                          # LoRA and full, the default variants, 20 steps, CPU
    python bench/throughput.py --methods lora --variants padded_plain,packed --steps 10
    python bench/throughput.py --device cuda --model-config qwen2-0.5b --attn flash_attention_2 --bf16 \\
        --batch 8 --max-len 2048                        # GPU: random-weight Qwen2-0.5B shape, with MFU

Timings are figures to read, never assertions; compare only ratios measured in one sitting on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "ruozhiba_qa.json"
HELD_OUT = 64  # the last records of the data file: evaluated, never trained on

# variant -> finetune arguments (every speed/memory setting spelled out, so defaults do not leak in).
# padded_plain is what a plain Trainer script does: file order, the model's own loss, no checkpointing.
_GLIBC = ["--malloc_mmap_threshold", "0"]
_LOWMEM = ["--malloc_mmap_threshold", str(1 << 20)]
VARIANTS: dict[str, list[str]] = {
    "padded_plain": ["--packing", "False", "--train_sampling_strategy", "sequential", "--chunked_loss", "False",
                     "--activation_checkpointing", "False", *_GLIBC],
    "padded": ["--packing", "False", "--train_sampling_strategy", "sequential", "--chunked_loss", "True",
               "--activation_checkpointing", "False", *_GLIBC],
    "grouped": ["--packing", "False", "--group_by_length", "True", "--chunked_loss", "True",
                "--activation_checkpointing", "False", *_GLIBC],
    "grouped_gc": ["--packing", "False", "--group_by_length", "True", "--chunked_loss", "True",
                   "--activation_checkpointing", "True", *_GLIBC],
    "packed_plain": ["--packing", "True", "--chunked_loss", "False", "--activation_checkpointing", "False", *_GLIBC],
    "packed": ["--packing", "True", "--chunked_loss", "True", "--activation_checkpointing", "False", *_GLIBC],
    "packed_gc": ["--packing", "True", "--chunked_loss", "True", "--activation_checkpointing", "True", *_GLIBC],
    "packed_gc2": ["--packing", "True", "--chunked_loss", "True", "--activation_checkpointing", "True",
                   "--activation_checkpointing_kwargs", '{"every_n_layers": 2}', *_GLIBC],
    # the low-memory configuration: checkpointing, and freed tensors handed back to the system
    "packed_lowmem": ["--packing", "True", "--chunked_loss", "True", "--activation_checkpointing", "True", *_LOWMEM],
    "packed_mmap": ["--packing", "True", "--chunked_loss", "True", "--activation_checkpointing", "False", *_LOWMEM],
}  # fmt: skip
DEFAULT_VARIANTS = ["padded_plain", "padded", "grouped", "packed", "packed_gc", "packed_lowmem"]

# Qwen2-0.5B's shape (random weights): for the GPU figures
MODEL_CONFIGS = {
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="alpaca-format JSON array (default: ruozhiba_qa.json)")
    p.add_argument(
        "--model", default=None, help="model folder (default: chatft.demo_model.DEFAULT_MODEL_DIR)"
    )
    p.add_argument(
        "--model-config", default=None, choices=sorted(MODEL_CONFIGS), help="random weights, this shape"
    )
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--epoch-of",
        type=int,
        default=None,
        metavar="N",
        help="instead of --steps: one epoch over the first N training records, the same examples for every variant",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--attn", default="sdpa", help="attention backend (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU: the device's dense bf16 peak")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out loss")
    p.add_argument("--tries", type=int, default=2, help="runs of a variant disturbed by other processes")
    p.add_argument("--contention-limit", type=float, default=0.1, help="share of the CPU others may take")
    p.add_argument("--out", default="/tmp/chatft_bench/throughput.json", help="raw results (JSON)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    from chatft.demo_model import DEFAULT_MODEL_DIR

    model = args.model or str(DEFAULT_MODEL_DIR)
    work = Path(tempfile.mkdtemp(prefix="chatft-bench-"))
    results = []
    try:
        train_file, eval_file = split_data(Path(args.data), work, args.epoch_of)
        if args.model_config:
            model = random_model(args.model_config, model, work / "model")
        print(machine_line(args.device))
        length = f"one epoch over {args.epoch_of} records" if args.epoch_of else f"{args.steps} steps"
        print(f"model {model}; data {args.data} ({HELD_OUT} records held out); {length} at batch "
              f"{args.batch} x max {args.max_len}; attention {args.attn}; {'bf16' if args.bf16 else 'fp32'}")  # fmt: skip
        for method in args.methods.split(","):
            for variant in args.variants.split(","):
                spec = {
                    "method": method, "variant": variant, "model": model, "train_file": str(train_file),
                    "eval_file": None if args.no_eval else str(eval_file), "steps": None if args.epoch_of else args.steps,
                    "batch": args.batch, "max_len": args.max_len, "device": args.device, "attn": args.attn,
                    "bf16": args.bf16, "out": str(work / f"{method}-{variant}"), "peak_tflops": args.peak_tflops,
                }  # fmt: skip
                result = run_variant(spec, args.tries, args.contention_limit)
                results.append(result)
                print(one_line(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"machine": machine_line(args.device), "results": results}, indent=2)
    )
    print()
    print(table(results))
    print(f"\nraw results: {args.out}")
    return 0 if all(r.get("rc") == 0 for r in results) else 1


def split_data(path: Path, work: Path, first: int | None = None) -> tuple[Path, Path]:
    records = json.loads(path.read_text(encoding="utf-8"))
    train, held = work / "train.json", work / "held_out.json"
    train.write_text(json.dumps(records[:-HELD_OUT][:first], ensure_ascii=False), encoding="utf-8")
    held.write_text(json.dumps(records[-HELD_OUT:], ensure_ascii=False), encoding="utf-8")
    return train, held


def random_model(name: str, tokenizer_dir: str, folder: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = dict(MODEL_CONFIGS[name])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)  # ids fit in the bigger vocabulary
    return str(folder)


def cpu_busy_seconds() -> float:
    """CPU time spent by everything on the machine so far (/proc/stat), in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_variant(spec: dict, tries: int = 1, contention_limit: float = 0.1) -> dict:
    """The variant in a child process (its own peak RSS from os.wait4), again while other processes took more
    than contention_limit of the machine's CPU during it (the machine may be shared); the least disturbed run."""
    best = None
    for attempt in range(1, tries + 1):
        result = run_once(spec)
        result["attempt"] = attempt
        if result.get("rc") != 0:
            return result
        if best is None or result["contention"] < best["contention"]:
            best = result
        if result["contention"] <= contention_limit:
            break
        print(
            f"  ({spec['method']} {spec['variant']}: other processes used {100 * result['contention']:.0f}% of the "
            f"CPU during the run{'; again' if attempt < tries else ''})",
            flush=True,
        )
    return best


def run_once(spec: dict) -> dict:
    result_file = Path(spec["out"]) / "result.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    log = open(Path(spec["out"]) / "log.txt", "w")  # noqa: SIM115 (closed below)
    start, busy = time.perf_counter(), cpu_busy_seconds()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    wall, busy = time.perf_counter() - start, cpu_busy_seconds() - busy
    log.close()
    rc = os.waitstatus_to_exitcode(status)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    own = usage.ru_utime + usage.ru_stime
    result.update(
        method=spec["method"], variant=spec["variant"], rc=rc, wall_s=round(wall, 1),
        peak_rss_mib=round(usage.ru_maxrss / 1024),
        contention=round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3),
    )  # fmt: skip
    if rc != 0:
        result["log_tail"] = (Path(spec["out"]) / "log.txt").read_text()[-3000:]
        print(result["log_tail"], file=sys.stderr)
    return result


def worker(spec: dict) -> int:
    """Runs inside the child: one finetune run, timed step by step, then its figures."""
    from transformers import TrainerCallback

    import chatft.training.sft
    import chatft.training.stages

    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step alone (logging and evaluation happen after on_step_end)."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

    class TimedTrainer(chatft.training.sft.ChatTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepTimer())

    chatft.training.sft.ChatTrainer = TimedTrainer  # the SFT stage builds its Trainer by this name
    out = Path(spec["out"])
    argv = [
        "--model_name_or_path", spec["model"], "--train_file", spec["train_file"], "--train_format", "alpaca",
        "--method", spec["method"], "--max_seq_length", str(spec["max_len"]),
        "--per_device_train_batch_size", str(spec["batch"]), "--per_device_eval_batch_size", str(spec["batch"]),
        "--learning_rate", "2e-4", "--lr_scheduler_type", "linear",
        "--warmup_steps", "0", "--weight_decay", "0", "--max_grad_norm", "1.0", "--seed", "42",
        "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target", "all-linear",
        "--attn_implementation", spec["attn"], "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--dataloader_num_workers", "0", "--output_dir", str(out / "run"),
        "--disable_tqdm", "True", *VARIANTS[spec["variant"]],
    ]  # fmt: skip
    if spec["steps"]:
        argv += ["--max_steps", str(spec["steps"])]
    else:
        argv += ["--num_train_epochs", "1"]
    if spec["eval_file"] and spec["steps"]:
        argv += [
            "--eval_file",
            spec["eval_file"],
            "--eval_strategy",
            "steps",
            "--eval_steps",
            str(spec["steps"]),
        ]
    elif spec["eval_file"]:
        argv += ["--eval_file", spec["eval_file"], "--eval_strategy", "epoch"]
    if spec["bf16"]:
        argv += ["--bf16", "True"]
    if spec["device"] == "cpu":
        argv += ["--use_cpu", "True"]
    rc = chatft.training.stages.main(argv)
    if rc != 0:
        return rc
    history = json.loads((out / "run" / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in history if "loss" in e and "examples_per_step" in e]
    final = next(e for e in history if "train_runtime" in e)
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    seconds = sum(step_seconds)
    ordered = sorted(step_seconds)
    result = {
        "train_s": round(seconds, 2),
        "median_step_s": round(ordered[len(ordered) // 2], 3),
        "steps": len(steps),
        "trained_tok_s": round(final["train_trained_tokens"] / seconds, 2),
        "tok_s": round(final["train_tokens"] / seconds, 2),
        "padding_share": final["train_padding_share"],
        "examples_per_step": round(final["train_examples"] / max(1, len(steps)), 2),
        "examples": final["train_examples"],
        "trained_tokens": final["train_trained_tokens"],
        "tokens": final["train_tokens"],
        "final_loss": round(sum(e["loss"] for e in steps[-5:]) / len(steps[-5:]), 4),
        "train_loss": round(final["train_loss"], 4),
        "eval_loss": round(evals[-1], 4) if evals else None,
        "losses": [round(e["loss"], 4) for e in steps],
        "step_seconds": [round(x, 3) for x in step_seconds],
    }
    import torch

    if torch.cuda.is_available() and spec["device"] == "cuda":
        result["cuda_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["mfu"] = mfu(spec, final["train_tokens"], seconds)
    (out / "result.json").write_text(json.dumps(result))
    return 0


def mfu(spec: dict, tokens: int, runtime: float) -> float:
    """Model FLOPs utilization: 6 N per token for full fine-tuning (forward 2N, backward 4N), 4 N for LoRA
    (no weight gradients of the frozen base), attention FLOPs left out; N = parameters without embeddings."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec["model"])
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    n = layers * per_layer + h * config.vocab_size  # the LM head counts (it runs on trained positions only)
    factor = 6 if spec["method"] == "full" else 4
    return round(factor * n * tokens / runtime / (spec["peak_tflops"] * 1e12), 4)


def machine_line(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU {cpu} x{os.cpu_count()}", f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if device == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def one_line(r: dict) -> str:
    if r.get("rc") != 0:
        return f"{r['method']:5} {r['variant']:13} FAILED (rc {r.get('rc')})"
    return (
        f"{r['method']:5} {r['variant']:13} trained {r['trained_tok_s']:8.1f} tok/s  non-pad {r['tok_s']:8.1f} "
        f"tok/s  padding {100 * r['padding_share']:5.1f}%  ex/step {r['examples_per_step']:5.1f}  "
        f"peak RSS {r['peak_rss_mib']:6d} MiB  loss {r['final_loss']:.4f}  eval {r['eval_loss']}  "
        f"({r['train_s']:.0f} s, others {100 * r['contention']:.0f}% CPU)"
    )


def table(results: list[dict]) -> str:
    head = (
        "| method | variant | trained tok/s | non-pad tok/s | padding | examples/step | peak RSS MiB | "
        "final loss (last 5) | held-out loss | train s | others' CPU | trained tok/s vs padded_plain | "
        "RSS vs padded_plain |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["method"]: r for r in results if r["variant"] == "padded_plain" and r.get("rc") == 0}
    for r in results:
        if r.get("rc") != 0:
            lines.append(f"| {r['method']} | {r['variant']} | failed |" + " |" * 11)
            continue
        b = base.get(r["method"])
        speed = f"{r['trained_tok_s'] / b['trained_tok_s']:.2f}x" if b else "-"
        rss = f"{r['peak_rss_mib'] / b['peak_rss_mib']:.2f}x" if b else "-"
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['trained_tok_s']:.1f} | {r['tok_s']:.1f} | "
            f"{100 * r['padding_share']:.1f}% | {r['examples_per_step']:.1f} | {r['peak_rss_mib']} | "
            f"{r['final_loss']:.4f} | {r['eval_loss'] if r['eval_loss'] is not None else '-'} | "
            f"{r['train_s']:.0f} | {100 * r['contention']:.0f}% | {speed} | {rss} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
