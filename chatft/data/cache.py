"""The on-disk cache of prepared data: an entry is a folder named by the cache key (dataset.cache_key) holding the
dataset (Arrow, loaded memory-mapped) and meta.json (the statistics, problems, formats and the log lines to
replay); written to a temporary folder and moved into place, so a reader never sees half an entry. Also the
key's ingredients a data file and a tokenizer give.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from chatft.data.schema import Problem
from chatft.data.stats import DataStats, PreparedData

CACHE_FORMAT = 3  # bump when what is stored changes shape


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bytes]]:
    """The tokenizer as save_pretrained writes it (what it is now, including a pad token set in memory)."""
    with tempfile.TemporaryDirectory(prefix="chatft-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return [(p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()) if p.is_file()]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_cached(folder: Path, prepared: PreparedData, lines: list[str]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        prepared.dataset.save_to_disk(str(tmp / "dataset"))
        stats = asdict(prepared.stats)
        stats.pop("seconds")
        stats.pop("cache")
        meta = {
            "stats": stats,
            "problems": [asdict(p) for p in prepared.problems],
            "formats": prepared.formats,
            "log": lines,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        if folder.exists():  # rebuilt (overwrite_cache) or written meanwhile by another process
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if bars:
            datasets.enable_progress_bars()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_cached(folder: Path, log: Callable[[str], None]) -> PreparedData | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        dataset = datasets.load_from_disk(str(folder / "dataset"))
    except (OSError, ValueError, KeyError):  # a damaged entry is a miss; it is rewritten
        return None
    for line in meta["log"]:
        log(line)
    stats = DataStats(**meta["stats"], cache=str(folder))
    problems = [Problem(**p) for p in meta["problems"]]
    return PreparedData(dataset, stats, problems, meta["formats"])
