"""--precision auto does not depend on timing noise: the CPU's flags decide (fake /proc/cpuinfo texts), a probe
only where there are none, kept per machine; a resumed run keeps the precision it started in."""

from __future__ import annotations

import json

import pytest

from chatft import machine
from chatft.machine import Shape, choose_precision, cpu_bf16_instructions

SMOLLM2 = Shape(576, 1536, 30, 49152)
XEON_AMX = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD_XEON = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize(
    ("cpuinfo", "has"),
    [(XEON_AMX, True), (EPYC, True), (OLD_XEON, False), (ARM_BF16, True), (ARM, False), ("", None)],
)
def test_bf16_instructions_are_read_from_the_cpus_flags(cpuinfo, has):
    assert cpu_bf16_instructions(cpuinfo) is has


def never(_shape):
    raise AssertionError("the flags decide: no probe")


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_the_flags_decide_whatever_a_timing_would_say(load, tmp_path):
    for cpuinfo, expected in ((XEON_AMX, "bf16"), (EPYC, "bf16"), (OLD_XEON, "fp32")):
        choices = {
            choose_precision(
                "auto", SMOLLM2, False, False, never, cpu_bf16_instructions(cpuinfo), tmp_path / "p.json"
            )[0]
            for _ in range(3)
        }
        assert choices == {expected}


def test_without_flags_a_probe_decides_once_per_machine(tmp_path):
    cache = tmp_path / "precision.json"
    noisy = iter([0.41, 12.6, 2.0])  # three timings of one busy machine (issue 22)
    calls = []

    def probe(shape):
        calls.append(shape)
        return next(noisy)

    first = choose_precision("auto", SMOLLM2, False, False, probe, None, cache)
    assert first[0] == "fp32" and "0.41x" in first[1]
    for _ in range(2):
        again = choose_precision("auto", SMOLLM2, False, False, probe, None, cache)
        assert again[0] == "fp32" and "kept from an earlier probe" in again[1]
    assert len(calls) == 1 and list(json.loads(cache.read_text()).values()) == [0.41]
    # another shape is probed on its own
    assert choose_precision("auto", Shape(64, 128, 2, 100), False, False, probe, None, cache)[0] == "bf16"


def test_the_probe_is_a_median_of_interleaved_pairs(monkeypatch):
    ticks = iter(
        # (fp32 start, fp32 end = bf16 start, bf16 end) for each of 5 pairs, ratios 2, 3, 0.1, 2, 4: one pair hit
        # by a burst of load while it multiplied in bf16
        [t for pair in [(0, 2, 3), (10, 13, 14), (20, 21, 31), (40, 42, 43), (50, 54, 55)] for t in pair]
    )
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
    assert machine.probe_bf16_speedup(Shape(8, 16, 1, 10), reps=5) == 2.0


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    from toy import save_tiny_model

    from chatft.training.command_line import parse_args

    model = tmp_path / "m"
    save_tiny_model(model)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "run_args.json").write_text(json.dumps({"training": {"precision": "fp32"}}))
    monkeypatch.setattr(machine, "cpu_bf16_instructions", lambda cpuinfo=None: True)  # today: bf16
    common = [
        "--model_name_or_path",
        str(model),
        "--train_file",
        "x.jsonl",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    fresh = parse_args(common)[-1]
    assert (fresh.precision, fresh.bf16) == ("bf16", True)
    for resume in ("auto", str(checkpoint)):
        args = parse_args([*common, "--resume_from_checkpoint", resume])[-1]
        assert (args.precision, args.bf16) == ("fp32", False)
        assert args.precision_why == f"auto: as the run resumed from {checkpoint} was trained"
    # asked for explicitly, the precision is the user's
    assert parse_args([*common, "--resume_from_checkpoint", "auto", "--precision", "bf16"])[-1].bf16
