"""Data at scale: how long until N conversations are ready to train (read, validated, rendered with the model's
template, tokenized, labelled, cached and packed), and at what peak memory; cold and cached, 1 and 2 workers;
LLaMA-Factory's get_dataset on the same files in the same sitting.

The data: ruozhiba's 1,475 records repeated with a varying prefix ("[copy] question") to N single-turn Alpaca
records (JSON lines), and a multi-turn set (OpenAI messages: a system message and three question/answer turns
from consecutive records). Each run is a fresh process (its imports and the tokenizer load counted in "ready");
its peak memory is the largest sum of RSS (and of PSS, which counts pages shared by forked workers once) over
the process and its workers, sampled every 0.2 s. "cached" runs the same command again on the cache the cold
run wrote. The peer runs its own get_dataset (`../shared/peer/lf_sft.yaml` settings, alpaca, chatml template,
its preprocessing_num_workers = workers) with a fresh HF datasets cache; its figure is ready-to-train for it
(LLaMA-Factory pads, it does not pack unless asked).

    python bench/scale.py                                   # 10k, 100k, 1M single-turn; 100k multi-turn
    python bench/scale.py --sizes 10000 --multi-turn 0 --workers 2 --peer ''   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUOZHIBA = ROOT.parent / "shared" / "data" / "ruozhiba_qa.json"
PEER_YAML = ROOT.parent / "shared" / "peer" / "lf_sft.yaml"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------------------------ the data


def single_turn(records: list[dict], n: int, out: Path) -> Path:
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            r = records[i % len(records)]
            copy = i // len(records)
            rec = {"instruction": f"[{copy}] {r['instruction']}", "input": "", "output": r["output"]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


def multi_turn(records: list[dict], n: int, out: Path) -> Path:
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [{"role": "system", "content": f"你是第 {i // len(records)} 号助手。"}]
            for k in range(3):
                r = records[(i + k) % len(records)]
                messages += [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return out


# ------------------------------------------------------------------------------------------- the child processes


def child_chatft(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from chatft.args import ModelArguments
    from chatft.data.dataset import prepare_data
    from chatft.methods import load_tokenizer
    from chatft.packing import PackedDataset

    tokenizer = load_tokenizer(
        ModelArguments(model_name_or_path=args.model)
    )  # as finetune.py: the same cache key
    prepared = prepare_data(
        [args.data], "auto", tokenizer, None, args.max_len, num_proc=args.workers,
        log=lambda _line: None, cache_dir=args.cache,
    )  # fmt: skip
    started = time.perf_counter()
    packed = PackedDataset(prepared.dataset, args.max_len, prepared.stats.lengths, prepared.folder)
    packing = time.perf_counter() - started
    print(
        json.dumps(
            {
                "ready_s": time.time() - _process_start(),
                "prepare_s": prepared.stats.seconds,
                "stages": {**prepared.stats.stages, "packing": packing},
                "cached": bool(prepared.stats.cache),
                "records": prepared.stats.records_read,
                "examples": len(prepared.dataset),
                "tokens": sum(prepared.stats.lengths),
                "rows": len(packed),
            }
        )
    )


def child_peer(args: argparse.Namespace) -> None:
    """LLaMA-Factory's own preprocessing, as `llamafactory-cli train` runs it before the model is loaded."""
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lf_scale_cache_")
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from omegaconf import OmegaConf

    folder = Path(tempfile.mkdtemp(prefix="lf_scale_data_"))
    (folder / "dataset_info.json").write_text(
        json.dumps({"scale": {"file_name": str(Path(args.data).resolve()), "formatting": "alpaca"}})
    )
    overrides = {
        "model_name_or_path": args.model,
        "dataset_dir": str(folder),
        "dataset": "scale",
        "cutoff_len": args.max_len,
        "preprocessing_num_workers": args.workers,
        "output_dir": tempfile.mkdtemp(prefix="lf_scale_out_"),
    }
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(PEER_YAML), overrides))
    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    started = time.perf_counter()
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    prepare = time.perf_counter() - started
    dataset = module["train_dataset"]
    print(
        json.dumps(
            {"ready_s": time.time() - _process_start(), "prepare_s": prepare, "stages": {}, "cached": False,
             "records": None, "examples": len(dataset), "tokens": None, "rows": len(dataset)}
        )
    )  # fmt: skip


def train_start(data: Path, cache: Path, args: argparse.Namespace) -> dict:
    """finetune.py on the cached data: one LoRA step of one row, nothing saved but the adapter."""
    out = Path(tempfile.mkdtemp(prefix="chatft-scale-run-"))
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", args.model, "--train_file", str(data),
           "--output_dir", str(out), "--max_seq_length", str(args.max_len), "--preprocessing_cache_dir", str(cache),
           "--max_steps", "1", "--per_device_train_batch_size", "1", "--save_strategy", "no", "--report_to", "none"]  # fmt: skip
    r = measure_cmd(cmd)
    output = r.pop("output")
    started = re.search(r"training starts ([0-9.]+) s after the process started", output)
    shutil.rmtree(out, ignore_errors=True)
    if started is None:
        raise SystemExit(f"finetune.py did not say when training started:\n{output[-3000:]}")
    return r | {"ready_s": float(started.group(1)), "prepare_s": 0.0, "stages": {},
                "cached": "loaded from the cache" in output, "examples": None, "tokens": None}  # fmt: skip


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


# ------------------------------------------------------------------------------------------------------ measuring


def measure(cmd: list[str]) -> dict:
    """Run cmd; its JSON result line plus wall time and the peak sum of RSS / PSS over its process tree."""
    r = measure_cmd(cmd)
    return json.loads(r.pop("output").strip().splitlines()[-1]) | r


def measure_cmd(cmd: list[str]) -> dict:
    """Run cmd: its stdout (output), wall time and the peak sum of RSS / PSS over its process tree."""
    import psutil

    started = time.perf_counter()
    # files, not pipes: progress bars and logs would fill a pipe that is read only at the end, and block the child
    output, errors = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=output, stderr=errors, text=True, cwd=ROOT)
    parent = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    output.seek(0)
    errors.seek(0)
    out, err = output.read(), errors.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"output": out, "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss / 2**20,
            "peak_pss_mb": peak_pss / 2**20}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="single-turn record counts")
    p.add_argument("--multi-turn", type=int, default=100_000, help="multi-turn records (0: none)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument(
        "--peer", default="/tmp/lf/bin/python", help="LLaMA-Factory's python ('' to skip the peer)"
    )
    p.add_argument("--work", default=None, help="folder for the data and caches (default: a temporary one)")
    p.add_argument("--train-start", action="store_true",
                   help="on the largest single-turn set: finetune.py (LoRA, 1 step) from the cache, the seconds from "
                   "its start to its training (its log's 'training starts N s after the process started')")  # fmt: skip
    p.add_argument("--child", choices=["chatft", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.workers = int(args.workers)
        (child_chatft if args.child == "chatft" else child_peer)(args)
        return 0

    from contention import cpu_name  # bench/ is this script's folder, on sys.path

    work = Path(args.work or tempfile.mkdtemp(prefix="chatft-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    records = json.loads(RUOZHIBA.read_text(encoding="utf-8"))
    sets = [
        (f"{int(n):,} single-turn", single_turn(records, int(n), work / f"single_{n}.jsonl"))
        for n in args.sizes.split(",")
    ]
    if args.multi_turn:
        n = args.multi_turn
        sets.append((f"{n:,} multi-turn", multi_turn(records, n, work / f"multi_{n}.jsonl")))
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; max_seq_length {args.max_len}; data in {work}",
        flush=True,
    )
    rows = []
    max_workers = max(int(w) for w in args.workers.split(","))
    largest = sets[len(args.sizes.split(",")) - 1][1]
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--max-len", str(args.max_len), "--model", args.model]
    for label, data in sets:
        mb = data.stat().st_size / 2**20
        for workers in (int(w) for w in args.workers.split(",")):
            cache = work / f"cache_{data.stem}_w{workers}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("cold", "cached"):
                r = measure([*me, "--child", "chatft", "--data", str(data), "--cache", str(cache),
                             "--workers", str(workers), *common])  # fmt: skip
                rows.append((label, "chatft", workers, run, r))
                _print(label, mb, "chatft", workers, run, r)
            if args.train_start and data == largest and workers == max_workers:
                r = train_start(data, cache, args)
                rows.append((label, "chatft finetune.py", workers, "cached", r))
                _print(label, mb, "chatft finetune.py", workers, "cached", r)
            shutil.rmtree(cache, ignore_errors=True)
        if args.peer and "multi-turn" not in label:
            for workers in (int(w) for w in args.workers.split(",")):
                r = measure(
                    [
                        args.peer,
                        *me[1:],
                        "--child",
                        "peer",
                        "--data",
                        str(data),
                        "--workers",
                        str(workers),
                        *common,
                    ]
                )
                rows.append((label, "LLaMA-Factory", workers, "cold", r))
                _print(label, mb, "LLaMA-Factory", workers, "cold", r)
    print(
        "\n| data | tool | workers | run | ready (s) | records/s | tokens/s | peak RSS (MB) | peak PSS (MB) | stages (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, tool, workers, run, r in rows:
        n = int(label.split()[0].replace(",", ""))
        tokens = f"{r['tokens'] / r['ready_s']:,.0f}" if r["tokens"] else ""
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        print(f"| {label} | {tool} | {workers} | {run} | {r['ready_s']:.1f} | {n / r['ready_s']:,.0f} | {tokens} | "
              f"{r['peak_rss_mb']:,.0f} | {r['peak_pss_mb']:,.0f} | {stages} |")  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(label: str, mb: float, tool: str, workers: int, run: str, r: dict) -> None:
    print(f"{label} ({mb:.0f} MB) {tool:13} workers {workers} {run:6}: ready {r['ready_s']:7.1f} s (preprocessing "
          f"{r['prepare_s']:.1f} s), {r['examples']} examples, cache hit {r['cached']}, peak RSS {r['peak_rss_mb']:,.0f} MB, PSS "
          f"{r['peak_pss_mb']:,.0f} MB {r['stages']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
