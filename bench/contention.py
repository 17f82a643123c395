"""Training on a busy machine: step time idle and beside one and two busy processes (a Python busy loop each).

Part 1, the settings: one LoRA step (r8 on every linear layer) of 1 x 512 tokens on the default model, bf16
autocast where the CPU has bf16 instructions (else fp32), forward + backward + AdamW; after 2 warm-up steps,
the median of --steps steps. Each setting in a fresh process (OpenMP reads its environment when torch loads):
- "torch defaults": one thread per core, libgomp's own spin;
- "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=20000", "1 thread": the fixed settings people reach for;
- "chatft": what chatft does (chatft.threads: the ThreadGovernor ticked between steps, as training ticks it
  between micro-batches).
Part 2 (--real): whole runs, chatft's finetune.py with its defaults against LLaMA-Factory 0.9.5's default LoRA
(../shared/peer, its venv set up by setup_llamafactory.sh) on ruozhiba, batch 4 x 512, --real_steps steps, idle
and beside one busy process: seconds per step (train_runtime / steps).

Figures are for reading, in ratios within one sitting, with nothing else running on the machine; the CPU is
named in the first line.

    python bench/contention.py                 # part 1: 5 settings x 0, 1, 2 busy processes
    python bench/contention.py --real          # and part 2
    python bench/contention.py --loads '' --repeat 3   # part 3 alone

Part 3 (--repeat N): chatft's same command (--real_steps steps, logged every step) N times idle and N times beside
one busy process, and once SIGKILLed after its first checkpoint beside one busy process and resumed there
(--resume_from_checkpoint auto): the precision each run chose and its logged losses against the first idle run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
PEER = ROOT.parent / "shared" / "peer"
SETTINGS = {
    "torch defaults": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=20000": {"GOMP_SPINCOUNT": "20000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "chatft": {},
}
BUSY = [sys.executable, "-c", "while True: pass"]


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """n Python busy loops running beside the block (after a second to get going); killed when it ends."""
    neighbours = [subprocess.Popen(BUSY) for _ in range(n)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for p in neighbours:
            p.kill()
            p.wait()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def worker(setting: str, steps: int) -> None:
    """Runs in its own process: prints one JSON line with the step times."""
    sys.path.insert(0, str(ROOT))
    if setting == "chatft":
        from chatft.threads import ThreadGovernor, this_process_budget
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (1, 512))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = any(
        f in flags.split() for f in ("amx_bf16", "avx512_bf16")
    )  # chatft.machine's rule, no chatft import
    governor = None
    if setting == "chatft":
        governor = ThreadGovernor(this_process_budget(), lambda line: print(line, file=sys.stderr))
        governor.start()
    times, threads = [], []
    for i in range(2 + steps):
        if governor is not None:
            governor.tick()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
            threads.append(torch.get_num_threads())
    print(json.dumps({"times": times, "threads": threads, "bf16": bf16}))


def measure(setting: str, busy: int, steps: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    }
    env |= SETTINGS[setting]
    with busy_loops(busy):
        r = subprocess.run(
            [sys.executable, __file__, "--worker", setting, "--steps", str(steps)],
            env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT,
        )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"{setting}, {busy} busy: failed\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["log"] = [line for line in r.stderr.splitlines() if line.startswith("threads:")]
    return result


def part1(steps: int, loads: list[int]) -> None:
    table: dict[str, dict[int, dict]] = {}
    for setting in SETTINGS:
        for busy in loads:
            table.setdefault(setting, {})[busy] = result = measure(setting, busy, steps)
            median = statistics.median(result["times"])
            print(f"  {setting:24s} busy={busy}: median {median:6.2f} s  steps {[round(t, 2) for t in result['times']]}"
                  f"  threads {result['threads']}", flush=True)  # fmt: skip
    base = "torch defaults"
    idle = statistics.median(table[base][0]["times"]) if 0 in loads and base in table else None
    print("\n| setting | " + " | ".join(f"{b} busy" for b in loads) + " |")
    print("| --- | " + " | ".join("---" for _ in loads) + " |")
    for setting in SETTINGS:
        cells = []
        for busy in loads:
            median = statistics.median(table[setting][busy]["times"])
            ratio = f" ({median / idle:.2f}x)" if idle else ""
            cells.append(f"{median:.2f} s{ratio}")
        print(f"| {setting} | " + " | ".join(cells) + " |")
    if idle:
        print(f"\n(x: the step time over {base}' idle step time)")


def chatft_command(folder: Path, steps: int, *extra: str) -> list[str]:
    """finetune.py with its defaults: LoRA r8 on ruozhiba, batch 4 x 512, `steps` steps logged every step."""
    return [sys.executable, "finetune.py", "--train_file", str(ROOT.parent / "shared/data/ruozhiba_qa.json"),
            "--output_dir", str(folder), "--method", "lora", "--lora_rank", "8", "--lora_alpha", "16",
            "--per_device_train_batch_size", "4", "--max_seq_length", "512", "--max_steps", str(steps),
            "--report_to", "none", "--logging_steps", "1", *extra]  # fmt: skip


def real_run(kind: str, busy: int, steps: int, out: Path) -> float:
    """Seconds per step of a whole run (train_runtime / steps)."""
    with busy_loops(busy):
        if kind == "chatft":
            folder = out / f"chatft_{busy}"
            cmd = chatft_command(folder, steps, "--save_strategy", "no")
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=7200)
            state = json.loads((folder / "trainer_state.json").read_text())
        else:
            env = os.environ | {"LF_MODEL": str(MODEL), "RUN_TAG": f"busy{busy}"}
            subprocess.run(["bash", str(PEER / "run_llamafactory.sh"), "lora", f"max_steps={steps}"], env=env,
                           check=True, capture_output=True, timeout=7200)  # fmt: skip
            folder = Path(os.environ.get("LF_RUNS", "/tmp/lf_runs")) / f"lora_busy{busy}" / "out"
            state = json.loads((folder / "trainer_state.json").read_text())
    runtime = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    return runtime / state["global_step"]


def part2(steps: int, out: Path) -> None:
    print(f"\nwhole runs, {steps} steps of batch 4 x 512, LoRA r8 (seconds per step):")
    print("| run | idle | 1 busy | 1 busy / idle |\n| --- | --- | --- | --- |")
    for kind in ("chatft", "LLaMA-Factory 0.9.5"):
        idle, busy = real_run(kind, 0, steps, out), real_run(kind, 1, steps, out)
        print(f"| {kind} | {idle:.2f} | {busy:.2f} | {busy / idle:.2f}x |", flush=True)


def chatft_run(folder: Path, steps: int, busy: int, extra: list[str], kill_after_save: bool = False) -> dict:
    """One chatft run (LoRA on ruozhiba, batch 4 x 512, seed 42, a checkpoint every steps // 2 steps) beside `busy`
    busy loops: its precision line and logged losses. kill_after_save: SIGKILLed once its first checkpoint is
    written (then nothing is read)."""
    cmd = chatft_command(folder, steps, "--save_steps", str(steps // 2), "--seed", "42", *extra)
    saved = folder / f"checkpoint-{steps // 2}" / "run_args.json"  # written last, by chatft's callback
    with busy_loops(busy), open(folder.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill_after_save and saved.is_file():
                proc.kill()
                proc.wait()
                return {}
            time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): see {folder.with_suffix('.log')}")
    text = folder.with_suffix(".log").read_text()
    precision = next((line for line in text.splitlines() if line.startswith("precision:")), "?")
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {"precision": precision, "losses": [h["loss"] for h in history if "loss" in h]}


def part3(runs: int, steps: int, out: Path) -> None:
    """The same command, `runs` times idle and `runs` times beside one busy loop, and once SIGKILLed after its
    first checkpoint beside one busy loop and resumed there: the precision each chose and how far its logged
    losses are from the first idle run's."""
    import shutil

    print(
        f"\nthe same run repeated, {steps} steps (precision chosen; largest |loss - first idle run's loss|):"
    )
    results = []
    for busy in (0, 1):
        for i in range(runs):
            folder = out / f"repeat_{busy}_{i}"
            shutil.rmtree(folder, ignore_errors=True)
            results.append((f"{busy} busy, run {i + 1}", chatft_run(folder, steps, busy, [])))
    folder = out / "repeat_killed"
    shutil.rmtree(folder, ignore_errors=True)
    chatft_run(folder, steps, 1, [], kill_after_save=True)
    resumed = chatft_run(folder, steps, 1, ["--resume_from_checkpoint", "auto"])
    first = results[0][1]["losses"]
    resumed["losses"] = (
        first[: steps - len(resumed["losses"])] + resumed["losses"]
    )  # the steps it did not redo
    results.append(("1 busy, killed after its first checkpoint, resumed", resumed))
    print("| run | precision | losses | max difference |\n| --- | --- | --- | --- |")
    for name, r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], first, strict=True))
        print(f"| {name} | {r['precision']} | {', '.join(f'{x:.4f}' for x in r['losses'])} | {diff:.4f} |",
              flush=True)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=4, help="measured steps per setting and load (default: 4)")
    p.add_argument("--loads", default="0,1,2", help="busy processes beside it (default: 0,1,2)")
    p.add_argument("--settings", help="comma-separated subset of the settings")
    p.add_argument("--real", action="store_true", help="also whole runs: chatft against LLaMA-Factory")
    p.add_argument("--real_steps", type=int, default=8, help="steps of each whole run (default: 8)")
    p.add_argument("--repeat", type=int, default=0,
                   help="also the same chatft run N times idle and N times beside a busy loop, and one killed and "
                   "resumed beside it: the precision chosen and the losses logged")  # fmt: skip
    p.add_argument("--out", default="/tmp/chatft_contention", help="work folder for --real and --repeat")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return 0
    if args.settings:
        for name in list(SETTINGS):
            if name not in args.settings.split(","):
                del SETTINGS[name]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.loads:
        part1(args.steps, [int(x) for x in args.loads.split(",")])
    if args.real:
        part2(args.real_steps, Path(args.out))
    if args.repeat:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        part3(args.repeat, args.real_steps, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
