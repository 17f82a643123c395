"""The preprocessing cache: a second identical call loads from disk; any change that matters misses."""

from __future__ import annotations

import json

import pytest
from toy import make_tokenizer

from chatft.data import dataset as dataset_module
from chatft.data.dataset import prepare_data

RECORDS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {
        "messages": [
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine, thanks!"},
        ]
    },
    {"messages": [{"role": "bot", "content": "?"}]},  # invalid: a located problem, cached too
]


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return f


def prepare(data, cache, tokenizer=None, **kwargs):
    lines: list[str] = []
    settings = {"fmt": "auto", "template_name": None, "max_seq_length": 64, **kwargs}
    p = prepare_data(
        [str(data)], settings.pop("fmt"), tokenizer or make_tokenizer(), settings.pop("template_name"),
        log=lines.append, cache_dir=cache, **settings,
    )  # fmt: skip
    return p, lines


def test_second_call_hits_the_cache(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cold, cold_log = prepare(data, cache)
    assert cold.stats.cache == ""
    assert not any("cache" in line for line in cold.stats.lines())

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset_module, "tokenize_records", no_tokenizing)
    warm, warm_log = prepare(data, cache)
    assert warm.stats.cache.startswith(str(cache))
    assert "loaded from the cache" in warm.stats.lines()[-1]
    # the format lines are replayed; what only the tokenizing run says (workers, who wrote the cache) is not
    assert [line for line in cold_log if "format" in line] == warm_log
    assert any(line.startswith("tokenizing 3 records") for line in cold_log)
    assert any(line.startswith("preprocessed by this process") for line in cold_log)
    assert warm.dataset.to_list() == cold.dataset.to_list()
    assert warm.problems == cold.problems and len(warm.problems) == 1
    assert warm.formats == cold.formats
    for name in ("records_read", "valid", "invalid", "skipped", "truncated", "lengths", "trained_tokens",
                 "closing_tokens", "notes"):  # fmt: skip
        assert getattr(warm.stats, name) == getattr(cold.stats, name)


def test_a_data_files_digest_is_kept_until_the_file_changes(tmp_path):
    from chatft.data.cache import DIGESTS_FILE, file_digest

    data, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    data.write_text('{"a": 1}\n')
    real = file_digest(data)
    assert file_digest(data, cache) == real
    known = json.loads((cache / DIGESTS_FILE).read_text())
    known[str(data)][1] = "remembered"
    (cache / DIGESTS_FILE).write_text(json.dumps(known))
    assert file_digest(data, cache) == "remembered"  # read back, not hashed
    data.write_text('{"a": 2}\n')  # the same size: its change time tells
    assert file_digest(data, cache) == file_digest(data) != real
    (cache / DIGESTS_FILE).write_text("{damaged")
    assert file_digest(data, cache) == file_digest(data)


def test_how_the_tokenizer_was_loaded_does_not_miss(data, tmp_path, monkeypatch):
    """save_pretrained records local_files_only, which follows HF_HUB_OFFLINE as transformers read it at its own
    import: the same tokenizer, loaded by a script that imported transformers before chatft, hit no cache."""
    cache = tmp_path / "cache"
    prepare(data, cache, make_tokenizer())

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset_module, "tokenize_records", no_tokenizing)
    tokenizer = make_tokenizer()
    tokenizer.init_kwargs |= {"local_files_only": True, "cache_dir": "/elsewhere"}
    warm, _ = prepare(data, cache, tokenizer)
    assert warm.stats.cache.startswith(str(cache))


@pytest.mark.parametrize(
    "change",
    ["max_seq_length", "max_target_length", "template", "format", "tokenizer", "content", "overwrite",
     "transformers", "tokenizers", "jinja2"],
)  # fmt: skip
def test_a_changed_setting_misses(data, tmp_path, change, monkeypatch):
    cache = tmp_path / "cache"
    prepare(data, cache)
    kwargs: dict = {}
    tokenizer = None
    if change == "max_seq_length":
        kwargs["max_seq_length"] = 63
    elif change == "max_target_length":
        kwargs["max_target_length"] = 5
    elif change == "template":
        kwargs["template_name"] = "chatml"
    elif change == "format":
        kwargs["fmt"] = "openai"
    elif change == "tokenizer":
        tokenizer = make_tokenizer()
        tokenizer.add_tokens(["brand-new"])
    elif change == "content":
        data.write_text(data.read_text().replace("hello there", "hello"))
    elif change == "overwrite":
        kwargs["overwrite_cache"] = True
    else:  # a new release of a library that renders or tokenizes
        real = dataset_module._version
        monkeypatch.setattr(dataset_module, "_version", lambda name: "9.9" if name == change else real(name))
    p, _ = prepare(data, cache, tokenizer, **kwargs)
    assert p.stats.cache == ""
    again, _ = prepare(data, cache, tokenizer, **{k: v for k, v in kwargs.items() if k != "overwrite_cache"})
    assert again.stats.cache != ""  # and that one is cached in turn
    assert again.dataset.to_list() == p.dataset.to_list()


def test_without_a_cache_folder_nothing_is_written(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = prepare_data([str(data)], "auto", make_tokenizer(), None, log=lambda _: None)
    assert p.stats.cache == ""
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]


# one process tokenizes (slowly: it sleeps first), the other is started while it does and must wait for it
_PREPARER = """
import sys, time
sys.path[:0] = [sys.argv[4], sys.argv[5]]
from toy import make_tokenizer
import chatft.data.dataset as d
real = d.tokenize_records
def slow(*args, **kwargs):
    print("TOKENIZING", flush=True)
    time.sleep(float(sys.argv[3]))
    return real(*args, **kwargs)
d.tokenize_records = slow
p = d.prepare_data([sys.argv[1]], "auto", make_tokenizer(), None, max_seq_length=64, log=print, cache_dir=sys.argv[2])
print("ROWS", p.dataset.to_list())
print(*p.stats.lines(), sep="\\n")
"""


def test_two_processes_on_the_same_data_tokenize_once(data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "prepare.py"
    script.write_text(_PREPARER)
    tests = Path(__file__).parent

    def start(delay: float) -> subprocess.Popen:
        cmd = [
            sys.executable,
            str(script),
            str(data),
            str(tmp_path / "cache"),
            str(delay),
            str(tests),
            str(tests.parent),
        ]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
        )

    first = start(3.0)
    said = []
    while not said or said[-1] not in ("TOKENIZING\n", ""):  # "": it ended without tokenizing
        said.append(first.stdout.readline())
    assert said[-1] == "TOKENIZING\n", "".join(said)
    second = start(0.0)
    out_first = "".join(said) + first.communicate(timeout=120)[0]
    out_second = second.communicate(timeout=120)[0]
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert "TOKENIZING" not in out_second  # never N-fold work
    assert "waiting for another process that prepares the same data" in out_second
    assert f"preprocessed by this process (pid {first.pid})" in out_first
    assert f"prepared by pid {first.pid})" in out_second  # which process did it, in the report
    rows = [line for line in out_first.splitlines() if line.startswith("ROWS")]
    assert rows and rows == [line for line in out_second.splitlines() if line.startswith("ROWS")]


def test_workers_start_from_a_lean_process_and_give_the_rows_of_one(tmp_path, monkeypatch):
    """Two workers: the map runs under multiprocess's fork server (not forked from this process, which holds
    torch), the start method is restored and the server stopped after; the rows are those of one process, which
    maps under the start method it had."""
    import datasets
    import multiprocess
    from multiprocess import forkserver

    before = multiprocess.get_start_method(allow_none=True)
    methods: list[str | None] = []
    real_map = datasets.Dataset.map

    def map_(self, *args, **kwargs):
        if kwargs.get("desc") == "tokenizing":
            methods.append(multiprocess.get_start_method(allow_none=True))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", map_)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(RECORDS[k % 3]) + "\n" for k in range(12)))
    two, log = prepare(data, tmp_path / "cache", num_proc=2)
    assert any("with 2 process(es)" in line for line in log)
    assert methods == ["forkserver"]
    assert multiprocess.get_start_method(allow_none=True) == before
    assert forkserver._forkserver._forkserver_pid is None  # stopped
    one, _ = prepare(data, tmp_path / "cache1", num_proc=1)
    assert methods == ["forkserver", before]
    columns = ["input_ids", "labels", "record"]
    assert (
        len(two.dataset) == 8
        and two.dataset.select_columns(columns)[:] == one.dataset.select_columns(columns)[:]
    )
    assert [(p.line, p.field) for p in two.problems] == [(p.line, p.field) for p in one.problems]


def test_lean_workers_have_not_imported_what_this_process_has(tmp_path, monkeypatch):
    """They import chatft from wherever the command runs (the server does not get sys.path)."""
    import os

    import multiprocess
    import torch  # noqa: F401  (held by this process, as by finetune.py)

    monkeypatch.chdir(tmp_path)

    with dataset_module._workers_from_a_lean_process(2), multiprocess.Pool(1) as pool:
        assert pool.apply(os.getppid) != os.getpid()
        assert pool.apply(eval, ("'torch' in __import__('sys').modules",)) is False
        assert pool.apply(eval, ("'chatft.data.dataset' in __import__('sys').modules",)) is True  # preloaded


def test_cached_path_encodes_rows_as_int32_arrays_equal_to_the_lists():
    """The workers keep a batch's token rows as int32 arrays (a ninth of a list's memory); the streaming path
    keeps lists; both hold the same ids and labels."""
    import numpy as np

    from chatft.data.templates import get_template

    tokenizer = make_tokenizer()
    batch = {"file": ["d.jsonl"] * 2, "record": [1, 2], "field": ["", ""], "error": ["", ""],
             "text": [json.dumps(r) for r in RECORDS[:2]]}  # fmt: skip
    settings = dataset_module.EncodeSettings(get_template(None, tokenizer), 64)
    lists = dataset_module._encode_batch(batch, tokenizer, settings, {"d.jsonl": "openai"})
    arrays = dataset_module._encode_batch(batch, tokenizer, settings, {"d.jsonl": "openai"}, arrays=True)
    for key in ("input_ids", "labels"):
        assert all(isinstance(row, list) for row in lists[key])
        assert all(isinstance(row, np.ndarray) and row.dtype == np.int32 for row in arrays[key])
        assert [row.tolist() for row in arrays[key]] == lists[key]
