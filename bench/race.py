"""The one-epoch race: chatft with its defaults against LLaMA-Factory 0.9.5 (../shared/peer), the same records.

The work: the first 200 ruozhiba records, one epoch, SmolLM2-135M-Instruct, LoRA r8/alpha 16 on every linear layer,
batch 4 x max 512 tokens, lr 2e-4 linear without warmup, seed 42, the ChatML template without a system turn for
both (chatft: --template chatml; the peer: template chatml). Each run is its own process, one after another:

- chatft: `finetune.py` with no speed or memory flag (its defaults: packing, precision and micro-batches chosen
  from the machine), and any variants given with --variant NAME="ARGS";
- the peer: `../shared/peer/run_llamafactory.sh` lora_gc (its default: gradient checkpointing) and
  lora_neat_packing (its fastest setting that keeps examples apart), with max_samples=200 num_train_epochs=1.

Measured per run: train time (the Trainer's train_runtime), wall time of the process, peak RSS (wait4 / GNU time),
and the held-out loss: the mean cross-entropy over the answer tokens of the last 64 ruozhiba records, computed the
same way for every adapter (chatft's encoding, fp32). Printed as a table with ratios; timings are figures to read,
compare only ratios measured in one sitting.

    python bench/race.py                                  # chatft defaults, the peer's default and neat_packing
    python bench/race.py --variant fp32="--precision fp32" --variant micro4="--micro_batch_size 4" --no-peer
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "ruozhiba_qa.json"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
TRAIN_RECORDS, HELD_OUT = 200, 64
WORK = ["--method", "lora", "--lora_rank", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4",
        "--max_seq_length", "512", "--learning_rate", "2e-4", "--num_train_epochs", "1", "--seed", "42",
        "--template", "chatml", "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none",
        "--preprocessing_cache", "False"]  # fmt: skip
PEER = {"peer default (gradient checkpointing)": "lora_gc", "peer neat_packing": "lora_neat_packing"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/chatft_race", help="work folder (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                   help="another chatft run with these extra finetune.py arguments")  # fmt: skip
    p.add_argument("--seeds", default="42", help="comma-separated seeds for the chatft defaults (spread)")
    p.add_argument("--no-peer", action="store_true", help="chatft runs only")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = prepare_data(out)
    runs: list[dict] = []
    for seed in args.seeds.split(","):
        runs.append(
            run_chatft(f"chatft defaults (seed {seed})", train, out / f"chatft_{seed}", ["--seed", seed])
        )
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        runs.append(run_chatft(f"chatft {name}", train, out / f"chatft_{name}", shlex.split(extra)))
    if not args.no_peer:
        for name, variant in PEER.items():
            runs.append(run_peer(name, variant))
    for run in runs:
        run["held_out_loss"] = held_out_loss(run["adapter"], held_out)
        print(json.dumps(run), flush=True)
    (out / "race.json").write_text(json.dumps(runs, indent=2))
    print(table(runs))
    return 0


def prepare_data(out: Path) -> tuple[Path, Path]:
    records = json.loads(DATA.read_text(encoding="utf-8"))
    train, held_out = out / "train.json", out / "held_out.json"
    train.write_text(json.dumps(records[:TRAIN_RECORDS], ensure_ascii=False), encoding="utf-8")
    held_out.write_text(json.dumps(records[-HELD_OUT:], ensure_ascii=False), encoding="utf-8")
    return train, held_out


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command run to its end (its output to log)."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)} (see {log})")
    return wall, usage.ru_maxrss * 1024


def run_chatft(name: str, train: Path, folder: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", str(MODEL), "--train_file",
           str(train), "--output_dir", str(folder), *WORK, *extra]  # fmt: skip
    print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    wall, rss = timed(cmd, folder.with_suffix(".log"))
    state = json.loads((folder / "trainer_state.json").read_text())
    final = next(e for e in state["log_history"] if "train_runtime" in e)
    log = folder.with_suffix(".log").read_text()
    chosen = [
        line for line in log.splitlines() if line.startswith(("precision:", "micro-batches:", "packing:"))
    ]
    return {"name": name, "train_s": final["train_runtime"], "wall_s": wall, "peak_rss": rss,
            "train_loss": final["train_loss"], "steps": state["global_step"], "adapter": str(folder),
            "chosen": chosen}  # fmt: skip


def run_peer(name: str, variant: str) -> dict:
    runs = Path(os.environ.get("LF_RUNS", "/tmp/lf_runs"))
    env = {**os.environ, "LF_MODEL": os.environ.get("LF_MODEL", str(MODEL))}
    cmd = ["bash", str(SHARED / "peer" / "run_llamafactory.sh"), variant, "max_samples=200", "num_train_epochs=1",
           "max_steps=-1"]  # fmt: skip
    print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    log = Path(f"/tmp/chatft_race_{variant}.log")
    wall, _ = timed(cmd, log, env)
    folder = runs / variant
    rss = next(
        int(line.split(":")[1]) * 1024
        for line in (folder / "time.txt").read_text().splitlines()
        if "Maximum resident set size" in line
    )
    results = json.loads((folder / "out" / "train_results.json").read_text())
    state = json.loads((folder / "out" / "trainer_state.json").read_text())
    return {"name": name, "train_s": results["train_runtime"], "wall_s": float((folder / "wall_s.txt").read_text()),
            "peak_rss": rss, "train_loss": results["train_loss"], "steps": state["global_step"],
            "adapter": str(folder / "out"), "chosen": [variant]}  # fmt: skip


def held_out_loss(adapter: str, held_out: Path) -> float:
    """The mean loss over the held-out answers' tokens (and their <|im_end|>), fp32, in its own process."""
    code = f"""
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from chatft.data.formats import load_conversations
from chatft.data.templates import NATIVE_TEMPLATES, encode
tok = AutoTokenizer.from_pretrained({str(MODEL)!r})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(MODEL)!r}), {adapter!r}).eval()
total = count = 0
for _, _, conv in load_conversations([{str(held_out)!r}], log=lambda _m: None).records:
    e = encode(conv, tok, NATIVE_TEMPLATES["chatml"])
    ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
    count += int(keep.sum())
print(total / count)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def table(runs: list[dict]) -> str:
    peer = {r["name"]: r for r in runs}
    neat = peer.get("peer neat_packing")
    default = peer.get("peer default (gradient checkpointing)")
    head = "| run | steps | train s | wall s | peak RSS GB | train loss | held-out loss |"
    rows = [head, "|" + " --- |" * 7]
    if neat and default:
        rows[0] += " train speed vs peer neat_packing | peak RSS vs peer default |"
        rows[1] += " --- | --- |"
    for r in runs:
        line = (
            f"| {r['name']} | {r['steps']} | {r['train_s']:.0f} | {r['wall_s']:.0f} | {r['peak_rss'] / 1e9:.2f} | "
            f"{r['train_loss']:.4f} | {r['held_out_loss']:.4f} |"
        )
        if neat and default:
            line += f" {neat['train_s'] / r['train_s']:.2f}x | {r['peak_rss'] / default['peak_rss']:.2f}x |"
        rows.append(line)
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
