"""The on-disk cache of prepared data: an entry is a folder named by the cache key (dataset.cache_key) holding the
tokenized Arrow files as the workers wrote them (loaded memory-mapped, never copied), keep.npy (the rows trained,
when not all are) and meta.json (the statistics, problems, formats and the log lines to replay). It is written in
a temporary folder beside it and renamed into place, so a reader never sees half an entry, under a lock file, so
that processes preparing the same data prepare it once: the others wait, then read it. Also the key's
ingredients a data file and a tokenizer give.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from chatft.data.raw import release_dataset_pages
from chatft.data.schema import Problem
from chatft.data.stats import DataStats, PreparedData

CACHE_FORMAT = 4  # bump when what is stored changes shape


# how the tokenizer was loaded, which save_pretrained records but which does not change a token: local_files_only
# follows HF_HUB_OFFLINE as transformers read it at its import, so the same tokenizer differed there
LOAD_OPTIONS = ("local_files_only", "cache_dir", "token", "use_auth_token", "_commit_hash")


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bytes]]:
    """The tokenizer as save_pretrained writes it (what it is now, including a pad token set in memory), less the
    options it was loaded with (LOAD_OPTIONS)."""
    with tempfile.TemporaryDirectory(prefix="chatft-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = [(p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()) if p.is_file()]
    return [
        (name, _without_load_options(data) if name == "tokenizer_config.json" else data)
        for name, data in files
    ]


def _without_load_options(config: bytes) -> bytes:
    settings = json.loads(config)
    for key in LOAD_OPTIONS:
        settings.pop(key, None)
    return json.dumps(settings, sort_keys=True).encode()


DIGESTS_FILE = "digests.json"  # in the cache folder: {path: [stamp, sha256]}


def file_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of the file's bytes. With cache_dir, the digest of a file whose stamp (size, inode, modification
    and change times: any write changes the change time) is unchanged is read from its digests.json instead of
    hashed again (half a second for a million records)."""
    st = path.stat()
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    known_file = cache_dir / DIGESTS_FILE if cache_dir is not None else None
    known: dict = {}
    if known_file is not None:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(known_file.read_text(encoding="utf-8"))
        seen = known.get(str(path))
        if isinstance(seen, list) and seen[0] == stamp:
            return seen[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if known_file is not None:
        known[str(path)] = [stamp, digest]
        with contextlib.suppress(OSError):  # a folder this process may not write: hashed each run
            known_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = known_file.with_name(f".{DIGESTS_FILE}.{os.getpid()}")
            temporary.write_text(json.dumps(known), encoding="utf-8")
            os.replace(temporary, known_file)
    return digest


def new_entry(folder: Path) -> Path:
    """A fresh temporary folder beside the entry's place (the same file system: moved into place at the end)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))


@contextmanager
def entry_lock(folder: Path, log: Callable[[str], None]) -> Iterator[bool]:
    """Hold the entry's lock file (folder + ".lock") while it is looked up and, on a miss, written: a second
    process preparing the same data waits (it is told so) and then reads the entry. Yields whether it waited."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            log(f"waiting for another process that prepares the same data (cache {folder})")
            started = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
            log(f"waited {time.perf_counter() - started:.1f} s; reading what it prepared")
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_cached(work: Path, folder: Path, prepared: PreparedData, lines: list[str]) -> None:
    """work (a new_entry holding the tokenized Arrow files, encoded*.arrow, and keep.npy when not every row is
    kept) gets meta.json and becomes the entry: renamed into place, so a reader never sees half an entry."""
    stats = asdict(prepared.stats)
    for key in ("seconds", "stages", "cache", "lengths"):  # lengths: the dataset's length column
        stats.pop(key)
    meta = {
        "stats": stats,
        "problems": [asdict(p) for p in prepared.problems],
        "formats": prepared.formats,
        "log": lines,
    }
    (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    if folder.exists():  # rebuilt (overwrite_cache)
        shutil.rmtree(folder, ignore_errors=True)
    os.replace(work, folder)


def load_cached(folder: Path, log: Callable[[str], None]) -> PreparedData | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        dataset = encoded_dataset(folder)
        lengths = dataset["length"][:] if len(dataset) else []
    except (OSError, ValueError, KeyError):  # a damaged entry is a miss; it is rewritten
        return None
    release_dataset_pages(dataset)  # the pages of the length column, read once
    for line in meta["log"]:
        log(line)
    stats = DataStats(**meta["stats"], lengths=list(lengths), cache=str(folder))
    problems = [Problem(**p) for p in meta["problems"]]
    return PreparedData(dataset, stats, problems, meta["formats"], folder)


KEPT_COLUMNS = ("file", "record", "input_ids", "labels", "length")


def encoded_dataset(folder: Path) -> datasets.Dataset:
    """The rows training reads from a folder of tokenized Arrow files (memory-mapped), with the columns it reads:
    every row, or those keep.npy lists. The pages opening them read (a page or so per record batch) are released
    (raw.release_mapped_pages)."""
    parts = [datasets.Dataset.from_file(str(f)) for f in sorted(folder.glob("encoded*.arrow"))]
    if not parts:
        raise ValueError(f"{folder}: no encoded*.arrow")
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    keep = folder / "keep.npy"
    if keep.is_file():
        dataset = dataset.select(np.load(keep))
    release_dataset_pages(dataset)
    return dataset.select_columns(list(KEPT_COLUMNS))
