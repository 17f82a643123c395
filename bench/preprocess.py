"""Data pipeline speed: records/s and tokens/s of prepare_data on the real data, 1 and 2 workers, cold and cached.

"cold" reads, validates and tokenizes (datasets.map, batched, num_proc = workers) and writes the cache;
"no cache" does the same without writing it; "cached" is a second identical call, which loads the result.
The data is the real file, and the same records repeated (--repeat) to show how the workers scale once the
process start-up of datasets.map is paid for.

    python bench/preprocess.py                      # ruozhiba_qa.json x1 and x8, SmolLM2 tokenizer
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "ruozhiba_qa.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="alpaca-format JSON array")
    p.add_argument("--tokenizer", default=None, help="default: chatft.demo_model.DEFAULT_MODEL_DIR")
    p.add_argument("--repeat", default="1,8", help="copies of the records, comma-separated")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--max-len", type=int, default=512)
    args = p.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from chatft.data.dataset import prepare_data
    from chatft.demo_model import DEFAULT_MODEL_DIR

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(DEFAULT_MODEL_DIR))
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="chatft-prep-"))
    rows = []
    try:
        for repeat in (int(x) for x in args.repeat.split(",")):
            data = work / f"data_x{repeat}.json"
            data.write_text(json.dumps(records * repeat, ensure_ascii=False), encoding="utf-8")
            for workers in (int(x) for x in args.workers.split(",")):
                cache = work / f"cache_x{repeat}_w{workers}"

                def run(cache_dir, workers=workers, data=data):
                    start = time.perf_counter()
                    prepared = prepare_data(
                        [str(data)], "alpaca", tokenizer, None, args.max_len, num_proc=workers,
                        log=lambda _: None, cache_dir=cache_dir,
                    )  # fmt: skip
                    return time.perf_counter() - start, prepared

                for label, cache_dir in (("no cache", None), ("cold", cache), ("cached", cache)):
                    seconds, prepared = run(cache_dir)
                    n, tokens = len(prepared.dataset), sum(prepared.stats.lengths)
                    rows.append(
                        (len(records) * repeat, workers, label, seconds, n / seconds, tokens / seconds)
                    )
                    print(
                        f"x{repeat} ({n} records, {tokens} tokens) workers {workers} {label:8}: {seconds:7.3f} s "
                        f"{n / seconds:10.0f} records/s {tokens / seconds:12.0f} tokens/s"
                        + (" (from cache)" if prepared.stats.cache else ""),
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| records | workers | run | seconds | records/s | tokens/s |\n|---|---|---|---|---|---|")
    for n, w, label, s, rps, tps in rows:
        print(f"| {n} | {w} | {label} | {s:.3f} | {rps:.0f} | {tps:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
