"""How many threads torch uses on the CPU: from what this process may use, and from how busy the machine is.

torch's OpenMP threads spin while they wait for each other; when other work takes a core, the thread that lost it
stalls every other one. One LoRA step of 1 x 512 tokens on a 2-core machine (docs/performance.md): 2.3 s idle
with 2 threads, 22-33 s with one busy process beside it; 1 thread takes 3.2-4.1 s there. No fixed setting is
right for both, so the count follows the machine:

- the budget: the cores this process may use (its CPU affinity, a cgroup CPU quota), shared by the training
  processes of this machine under torchrun (LOCAL_WORLD_SIZE);
- between units of work (a micro-batch, a generation batch) ThreadGovernor.tick() reads how much CPU time the
  rest of the machine took since the last reading (/proc/stat less the time of this process and of the processes
  it started, own_cpu_time) and uses the cores left free, at least one: fewer threads at once when other work
  arrives (a stall costs 10x), more again only after two readings agree that it left (a wrong guess there costs
  1.4x);
- --threads N (or OMP_NUM_THREADS, outside torchrun) fixes the count instead.

Where /proc/stat cannot be read (not Linux), the budget is used as it is.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FREE_MARGIN = 0.25  # a core counts as free when at most this much of it is taken by other work
MIN_INTERVAL_S = 0.5  # shorter readings of /proc/stat (100 ticks a second) are noise


@dataclass(frozen=True)
class CpuBudget:
    threads: int  # the most threads this process should use
    why: str
    fixed: bool = False  # --threads / OMP_NUM_THREADS: never adapted


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores the cgroup's CPU quota allows (cgroup v2 cpu.max, v1 cfs quota/period), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cpu_budget(
    threads: int | None,
    affinity: int,
    quota: float | None,
    local_processes: int,
    omp_num_threads: str | None = None,
    torch_threads: int | None = None,
) -> CpuBudget:
    """The budget from what the process may use: --threads, else OMP_NUM_THREADS (when the user set it), else
    the affinity and quota shared by the local processes, and never more than torch_threads, what torch is set to
    (its default is the physical cores; a program that set fewer chose them)."""
    if threads is not None:
        return CpuBudget(max(1, threads), f"--threads {threads}", fixed=True)
    if omp_num_threads and omp_num_threads.isdigit() and local_processes == 1:
        return CpuBudget(max(1, int(omp_num_threads)), f"OMP_NUM_THREADS={omp_num_threads}", fixed=True)
    cores, why = affinity, f"{affinity} core(s) this process may run on"
    if quota is not None and quota < cores:
        cores, why = max(1, math.floor(quota)), f"a CPU quota of {quota:g} core(s)"
    if local_processes > 1:
        cores, why = max(1, cores // local_processes), f"{why}, shared by {local_processes} processes"
    if torch_threads is not None and torch_threads < cores:
        cores, why = (
            torch_threads,
            f"torch set to {torch_threads} thread(s) by this program or its physical cores",
        )
    return CpuBudget(max(1, cores), why)


def this_process_budget(threads: int | None = None) -> CpuBudget:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    omp = os.environ.get("OMP_NUM_THREADS") if "LOCAL_RANK" not in os.environ else None  # torchrun sets it
    import torch

    return cpu_budget(threads, affinity, cgroup_cpu_limit(), local, omp, torch.get_num_threads())


def threads_for(budget: int, machine_cores: int, others_busy: float) -> int:
    """The cores left free by other work (others_busy: cores they kept busy), within the budget, at least one."""
    free = machine_cores - others_busy
    return max(1, min(budget, math.floor(free + FREE_MARGIN)))


def read_proc_stat(path: str = "/proc/stat") -> tuple[float, int] | None:
    """(seconds of CPU time all cores spent busy since boot, the machine's core count), or None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user already; stolen time
    # is time the hypervisor gave to other machines: taken from this one as surely as a neighbour's
    busy = sum(fields[:8]) - fields[3] - fields[4]
    cores = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), cores


def own_cpu_time() -> float:
    """CPU seconds of this process and of its descendants: the live ones (TorchInductor's compile workers, a data
    loader's), and the exited ones it or they waited for (a C++ compiler run). Work this process started is its
    own, not other work competing for the cores: counted as other work, a compile would take a thread away from
    training, and compiled code (chatft.inductor) would compile again for the new thread count."""
    import psutil

    ended = os.times()
    total = time.process_time() + ended.children_user + ended.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # exited since it was listed
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class LoadMeter:
    """Cores kept busy by everything but this process (and what it started) since the previous reading."""

    def __init__(
        self,
        machine: Callable[[], tuple[float, int] | None] = read_proc_stat,
        own: Callable[[], float] = own_cpu_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine, self.own, self.clock = machine, own, clock
        self.last: tuple[float, float, float] | None = None
        self.cores = 0

    def reset(self) -> None:
        self.last = self.sample()

    def sample(self) -> tuple[float, float, float] | None:
        stat = self.machine()
        if stat is None:
            return None
        busy, self.cores = stat
        return self.clock(), busy, self.own()

    def others_busy(self, min_interval: float = MIN_INTERVAL_S) -> float | None:
        """Cores others kept busy since the last reading (None: too soon, or nothing to read)."""
        if self.last is None:
            self.reset()
            return None
        now = self.sample()
        if now is None or now[0] - self.last[0] < min_interval:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


class ThreadGovernor:
    """Sets torch's thread count at start() and, unless the budget is fixed, again at each tick() that finds the
    machine's free cores changed (fewer at once, more after two agreeing readings). log gets one line a change."""

    def __init__(
        self,
        budget: CpuBudget,
        log: Callable[[str], None] = print,
        meter: LoadMeter | None = None,
        set_threads: Callable[[int], None] | None = None,
    ) -> None:
        self.budget, self.log = budget, log
        self.meter = meter or LoadMeter()
        self.set_threads = set_threads or _torch_set_num_threads
        self.threads = budget.threads
        self.pending: int | None = None  # a higher count seen once, applied when seen again
        self.changes = 0
        self.before: int | None = None
        self.started = False

    def start(self) -> None:
        self.started = True
        self.before = _torch_get_num_threads()
        self.set_threads(self.threads)
        adapting = "" if self.budget.fixed else "; fewer while other work keeps cores busy"
        self.log(f"threads: {self.threads} ({self.budget.why}){adapting}")
        if not self.budget.fixed:
            self.meter.reset()

    def stop(self) -> None:
        """torch's thread count as it was before start()."""
        if self.before is not None:
            self.set_threads(self.before)

    def tick(self) -> None:
        """Between units of work; the first tick starts the governor in the calling thread when start() was not
        called (OpenMP's thread count belongs to the thread that sets it: a server's generation thread)."""
        if not self.started:
            self.start()
            return
        if self.budget.fixed:
            return
        others = self.meter.others_busy()
        if others is None:
            return
        wanted = threads_for(self.budget.threads, self.meter.cores or self.budget.threads, others)
        if wanted < self.threads or (wanted > self.threads and self.pending == wanted):
            self._apply(wanted, others)
        else:
            self.pending = wanted if wanted > self.threads else None

    def _apply(self, threads: int, others: float) -> None:
        before, self.threads, self.pending = self.threads, threads, None
        self.set_threads(threads)
        self.changes += 1
        self.log(
            f"threads: {before} -> {threads} (other work kept {others:.1f} of {self.meter.cores} core(s) busy)"
        )


def _torch_set_num_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _torch_get_num_threads() -> int:
    import torch

    return torch.get_num_threads()
