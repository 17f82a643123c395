"""--streaming on the tiny model: the stream packs every example of a pass once, trains, resumes exactly after a
SIGKILL (across a pass over the data), splits the data between 2 processes (CPU gloo), and stops at an invalid
record unless told to skip it (counted, named)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killed_run import run_killed
from test_train import FP32, ROOT, logged_losses, run, tensors, tiny_model  # noqa: F401 (a fixture)
from toy import make_tokenizer, many_chats, openai_jsonl

from chatft.args import DataArguments, ModelArguments
from chatft.training.stages import main
from chatft.training.stream import StreamedRows, open_stream


@pytest.fixture(scope="module")
def two_files(tmp_path_factory) -> str:
    """The 24 chats of tests/toy.py in two files (one a process under 2 processes): with --max_seq_length 96 about
    ten rows a pass, so 8 steps of 2 rows cross into a second pass."""
    folder = tmp_path_factory.mktemp("stream")
    chats = many_chats(24)
    (folder / "a.jsonl").write_text(openai_jsonl(chats[:12]))
    (folder / "b.jsonl").write_text(openai_jsonl(chats[12:]))
    return str(folder)


STREAM = ["--streaming", "--buffer_size", "8", "--max_seq_length", "96", "--method", "full"]


def _stream(folder: str, packing: bool = True) -> StreamedRows:
    class Training:  # what open_stream reads of the Trainer's arguments
        seed, world_size, process_index = 42, 1, 0

    data_args = DataArguments(train_file=[folder], max_seq_length=96, buffer_size=8)
    rows, _ = open_stream([folder], data_args, ModelArguments(), Training(), make_tokenizer(), packing, print)
    return rows


def test_a_pass_packs_every_example_once_in_rows_that_fit(two_files):
    examples = [tuple(e["input_ids"]) for e in _stream(two_files, packing=False)._examples()]
    assert len(examples) == 24
    rows, given = _stream(two_files), []
    stream = iter(rows)
    while sum(len(r["seq_lens"]) for r in given) < 24:
        given.append(next(stream))
    assert sum(len(r["seq_lens"]) for r in given) == 24 and len(given) < 15  # a pass ends in whole rows
    assert all(len(r["input_ids"]) <= 96 and sum(r["seq_lens"]) == len(r["labels"]) for r in given)
    packed = []
    for r in given:
        starts = [sum(r["seq_lens"][:k]) for k in range(len(r["seq_lens"]))]
        packed += [tuple(r["input_ids"][a : a + n]) for a, n in zip(starts, r["seq_lens"], strict=True)]
        assert all(r["labels"][a] == -100 for a in starts)  # never predicted from the example before
    assert sorted(packed) == sorted(examples)  # each once: none dropped, none twice


def test_skipping_rows_gives_the_rest_of_the_same_stream(two_files):
    whole = iter(_stream(two_files))
    rows = [next(whole) for _ in range(30)]  # three passes
    resumed = _stream(two_files)
    resumed.skip_rows = 17
    again = iter(resumed)
    assert [next(again) for _ in range(13)] == rows[17:]
    assert resumed.counts["rows"] == 30


def test_a_streamed_run_killed_resumes_to_the_same_losses_and_weights(tiny_model, two_files, tmp_path):  # noqa: F811
    common = [
        *STREAM,
        "--max_steps",
        "8",
        "--save_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--warmup_steps",
        "2",
        "--threads",
        "1",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(tiny_model, two_files, whole, *common) == 0
    argv = ["--model_name_or_path", tiny_model, "--train_file", two_files, "--output_dir", str(killed),
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "42",
            *FP32, *common]  # fmt: skip
    run_killed(5, argv)
    state = json.loads((killed / "checkpoint-4" / "stream_state_0.json").read_text())
    assert state["rows"] == 8 and state["examples"] > 8  # 4 steps of 2 packed rows
    assert main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    a, b = logged_losses(whole), logged_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and len(set(a.values())) == 8
    assert b == pytest.approx(a, abs=1e-5)
    end = json.loads((whole / "trainer_state.json").read_text())["log_history"][-1]
    assert end["train_examples"] > 20  # 16 rows: into the second pass over the 24 examples
    mine, theirs = tensors(whole / "model.safetensors"), tensors(killed / "model.safetensors")
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-5, rtol=1e-4)


def test_two_processes_each_read_their_own_file(tiny_model, two_files, tmp_path):  # noqa: F811
    from test_train import free_port

    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "finetune.py"), "--model_name_or_path", tiny_model, "--train_file", two_files,
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
        "--seed", "42", *FP32, *STREAM, "--max_steps", "3", "--save_strategy", "no",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "split between 2 processes (whole files per process" in r.stdout
    # 3 steps of 2 rows each, a file each; found by pattern: the two processes' output may share a line
    ends = sorted(re.findall(r"\[process (\d)\] streaming: 6 rows [^\n]*?read from (\w+\.jsonl)", r.stdout))
    assert [p for p, _ in ends] == ["0", "1"] and sorted(f for _, f in ends) == ["a.jsonl", "b.jsonl"]
    assert sorted(logged_losses(out)) == [1, 2, 3]


def test_an_invalid_record_stops_the_stream_unless_skipped(tiny_model, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "d.jsonl"
    chats = openai_jsonl(many_chats(6)).splitlines()
    chats.insert(3, json.dumps({"messages": [{"role": "bot", "content": "?"}]}))
    data.write_text("\n".join(chats) + "\n")
    argv = [*STREAM, "--max_steps", "2", "--save_strategy", "no"]
    assert run(tiny_model, str(data), tmp_path / "a", *argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:4: messages[0].role: must be one of" in err and "--skip_invalid_records" in err
    assert run(tiny_model, str(data), tmp_path / "b", *argv, "--skip_invalid_records", "True") == 0
    out = capsys.readouterr().out
    assert f"streaming: skipping invalid record {data}:4: messages[0].role" in out
    assert ", 1 invalid skipped," in out


def test_streaming_needs_max_steps(tiny_model, two_files, tmp_path, capsys):  # noqa: F811
    assert run(tiny_model, two_files, tmp_path / "o", *STREAM, "--num_train_epochs", "1") == 2
    assert "--streaming: give --max_steps" in capsys.readouterr().err


def test_a_url_reads_as_the_local_file(two_files):
    """Any fsspec URL (here file://) gives the rows the local path gives."""
    from chatft.training.stream import _raw_rows

    local = Path(two_files) / "a.jsonl"
    url = [{**row, "file": str(local)} for row in _raw_rows([local.as_uri()])]
    assert url == list(_raw_rows([str(local)])) and len(url) == 12
