"""chatft.threads on fake machines: the budget from affinity, quotas, torchrun and the user; the load others put on
the machine; the thread count following a load that comes and goes; and training logging what it chose."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatft.threads import (
    CpuBudget,
    LoadMeter,
    ThreadGovernor,
    cgroup_cpu_limit,
    cpu_budget,
    read_proc_stat,
    threads_for,
)


@pytest.mark.parametrize(
    ("kwargs", "threads", "fixed"),
    [
        ({"affinity": 2, "quota": None, "local_processes": 1}, 2, False),
        ({"affinity": 8, "quota": 2.5, "local_processes": 1}, 2, False),  # a container's quota on a big host
        ({"affinity": 8, "quota": 0.5, "local_processes": 1}, 1, False),
        ({"affinity": 8, "quota": None, "local_processes": 2}, 4, False),  # torchrun, 2 processes per node
        ({"affinity": 2, "quota": None, "local_processes": 4}, 1, False),
        (
            {"affinity": 16, "quota": None, "local_processes": 1, "torch_threads": 8},
            8,
            False,
        ),  # physical cores
        ({"affinity": 2, "quota": None, "local_processes": 1, "threads": 3}, 3, True),
        ({"affinity": 2, "quota": None, "local_processes": 1, "omp_num_threads": "1"}, 1, True),
        # under torchrun OMP_NUM_THREADS is torchrun's, not the user's: this_process_budget drops it
        ({"affinity": 4, "quota": None, "local_processes": 2, "omp_num_threads": "1"}, 2, False),
    ],
)
def test_the_budget_is_what_the_process_may_use(kwargs, threads, fixed):
    budget = cpu_budget(kwargs.pop("threads", None), **kwargs)
    assert (budget.threads, budget.fixed) == (threads, fixed), budget.why


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_proc_stat_busy_time_counts_steal_and_not_idle_or_iowait(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        "cpu  100 5 20 1000 50 1 2 30 7 0\ncpu0 50 2 10 500 25 0 1 15 0 0\ncpu1 50 3 10 500 25 1 1 15 7 0\n"
    )
    busy, cores = read_proc_stat(str(stat))
    assert (busy, cores) == (pytest.approx((100 + 5 + 20 + 1 + 2 + 30) / 100), 2)


@pytest.mark.parametrize(("others", "threads"), [(0.0, 2), (0.2, 2), (0.5, 1), (1.0, 1), (1.9, 1), (3.0, 1)])
def test_threads_use_the_cores_others_leave_free(others, threads):
    assert threads_for(2, 2, others) == threads


def test_on_a_big_host_other_tenants_leave_the_budget_alone():
    assert threads_for(4, 64, 30.0) == 4


class FakeMachine:
    """A 2-core machine on which this process uses `own` cores and others `others` cores, second by second."""

    def __init__(self) -> None:
        self.t = 0.0
        self.busy = 0.0
        self.own_time = 0.0

    def run(self, seconds: float, own: float, others: float) -> None:
        self.t += seconds
        self.own_time += own * seconds
        self.busy += (own + others) * seconds

    def meter(self) -> LoadMeter:
        return LoadMeter(machine=lambda: (self.busy, 2), own=lambda: self.own_time, clock=lambda: self.t)


def test_the_meter_reads_the_others_load():
    machine = FakeMachine()
    meter = machine.meter()
    meter.reset()
    machine.run(2.0, own=1.0, others=1.0)
    assert meter.others_busy() == pytest.approx(1.0)
    machine.run(0.1, own=1.0, others=1.0)
    assert meter.others_busy() is None  # too short a reading to trust: it joins the next one
    machine.run(2.0, own=2.0, others=0.0)
    assert meter.others_busy() == pytest.approx(0.1 / 2.1)


def test_threads_follow_a_load_that_comes_and_goes():
    machine = FakeMachine()
    applied, lines = [], []
    governor = ThreadGovernor(CpuBudget(2, "2 cores"), lines.append, machine.meter(), applied.append)
    governor.start()
    seen = []
    for others in [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]:
        machine.run(3.0, own=governor.threads if others == 0 else 1.0, others=others)
        governor.tick()
        seen.append(governor.threads)
    # down at once when a neighbour arrives; up only after two readings agree that it left
    assert seen == [2, 2, 1, 1, 1, 1, 2, 2, 1]
    assert applied[:1] == [2] and governor.changes == 3
    assert lines[0].startswith("threads: 2 (2 cores)")
    assert lines[1] == "threads: 2 -> 1 (other work kept 1.0 of 2 core(s) busy)"
    governor.stop()
    assert applied[-1] == governor.before


def test_a_fixed_count_never_changes():
    machine = FakeMachine()
    applied = []
    governor = ThreadGovernor(
        CpuBudget(2, "--threads 2", fixed=True), lambda _: None, machine.meter(), applied.append
    )
    governor.start()
    for _ in range(3):
        machine.run(3.0, own=1.0, others=1.0)
        governor.tick()
    assert applied == [2] and governor.changes == 0


def test_training_logs_the_thread_choice_follows_the_load_and_restores_the_count(
    tmp_path, capsys, monkeypatch
):
    import torch
    from toy import CHATS, openai_jsonl, save_tiny_model

    import chatft.training.process
    from chatft.training.stages import main

    model = tmp_path / "m"
    save_tiny_model(model)
    data = tmp_path / "d.jsonl"
    data.write_text(openai_jsonl(CHATS))
    monkeypatch.setattr(
        chatft.training.process, "this_process_budget", lambda threads: CpuBudget(2, "fake 2 cores")
    )

    def others_keep_a_core_busy(self, min_interval=0.5):  # a 2-core machine with a busy neighbour
        self.cores = 2
        return 1.0

    monkeypatch.setattr(LoadMeter, "others_busy", others_keep_a_core_busy)
    before = torch.get_num_threads()
    argv = ["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "2", "--save_steps", "100", "--precision", "fp32"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "threads: 2 (fake 2 cores); fewer while other work keeps cores busy" in out
    assert "threads: 2 -> 1 (other work kept 1.0 of 2 core(s) busy)" in out
    assert torch.get_num_threads() == before


def test_generation_looks_at_the_load_between_tokens(byte_models):
    from chatft.inference.cli import make_parser
    from chatft.inference.generation import GenerationOptions, generate_one
    from chatft.inference.loading import load_session

    session = load_session(
        make_parser().parse_args(["--model", str(byte_models["base"]), "--threads", "1"]), print
    )
    assert session.governor is not None and session.governor.budget == CpuBudget(1, "--threads 1", fixed=True)
    ticks = []
    session.governor = SimpleNamespace(tick=lambda: ticks.append(1))
    answer = generate_one(session, session.tokenizer("hi")["input_ids"], GenerationOptions(max_new_tokens=6))
    assert answer.produced == 6 and len(ticks) == 6


def test_processes_this_one_started_are_its_own_work_not_other_load():
    """A child process (as TorchInductor's compile workers and the C++ compiler they run are) that has done some work
    and waits: its CPU time is in own_cpu_time while it lives and after it ended, and the load meter subtracts
    own_cpu_time from the machine's busy time, so the child is not other load."""
    import subprocess
    import sys

    from chatft.threads import own_cpu_time

    assert LoadMeter().own is own_cpu_time
    work = "import time\nx = 0\nfor i in range(5 * 10**6): x += i\nprint(time.process_time(), flush=True)\ntime.sleep(60)"
    before = own_cpu_time()
    child = subprocess.Popen([sys.executable, "-c", work], stdout=subprocess.PIPE, text=True)
    used = float(child.stdout.readline())  # the child's CPU seconds, its work done
    live = own_cpu_time() - before
    child.terminate()
    child.wait()
    ended = own_cpu_time() - before
    assert used > 0.1 and live >= 0.95 * used and ended >= 0.95 * used
