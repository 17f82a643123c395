"""What every training process sets up: glibc's memory behaviour (the mmap threshold; freed memory handed back
when the heap grows past what a micro-batch needs), the memory-mapped data's pages released as training reads on,
torch's threads fitted to the machine's load (chatft.threads), no pinned memory on the CPU, and the log (the main
process prints, the others not)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from transformers import Trainer, TrainerCallback

from chatft.data.raw import release_mapped_pages
from chatft.threads import ThreadGovernor, this_process_budget


def set_malloc_mmap_threshold(threshold: int) -> bool:
    """glibc mallopt(M_MMAP_THRESHOLD): a fixed threshold (which also turns off glibc's dynamic raising of it).
    True when set; False elsewhere (not glibc, 0, or the environment already chose)."""
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def start_process(training_args) -> Callable[[str], None]:
    """What every stage sets up per process: glibc's mmap threshold, no pinned memory on the CPU (nothing to pin
    for; torch would warn at every epoch). Returns the log function: the main process prints, the others not."""
    set_malloc_mmap_threshold(training_args.malloc_mmap_threshold)
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False
    return print if training_args.process_index == 0 else (lambda _msg: None)


def glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) (every arena's free pages back to the system), or None where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def resident_bytes() -> int | None:
    """This process's resident memory (RSS) in bytes, from /proc/self/statm; None where there is none. (Not the
    peak, VmHWM: resetting it through /proc/self/clear_refs would also reset the peak that wait4 and GNU time
    report for the process.)"""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class ReleaseFreedMemory(TrainerCallback):
    """--malloc_trim: after a micro-batch (or optimizer step), the memory freed into glibc's heap goes back to the
    system once the process has grown more than `slack` past what a micro-batch was seen to need.

    Trimming after every micro-batch kept the heap from filling with the freed activations of varying shapes, but
    each trim costs the next micro-batch the page faults of touching that memory again. So the need is measured
    instead: the resident memory at the end of a micro-batch that started from a trimmed heap is what one
    micro-batch takes (the largest such reading is kept); a later reading above it by more than `slack` is growth
    of the heap, and is trimmed. Where the resident memory cannot be read, every micro-batch is trimmed."""

    slack = 0.10

    def __init__(
        self,
        trim: Callable[[], object],
        log: Callable[[str], None] = print,
        resident: Callable[[], int | None] | None = None,
    ) -> None:
        self.trim = trim
        self.log = log
        self.resident = resident or resident_bytes
        self.need = 0
        self.fresh = True  # the micro-batch now running started from a trimmed heap
        self.trims = 0
        self.checks = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.hand_back()  # what loading left behind, so that the first micro-batch measures itself

    def on_substep_end(self, args, state, control, **kwargs):
        self.after_micro_batch()

    def on_step_end(self, args, state, control, **kwargs):
        self.after_micro_batch()

    def on_train_end(self, args, state, control, **kwargs):
        need = f" (a micro-batch needs {self.need / 2**30:.2f} GiB resident)" if self.need else ""
        self.log(f"memory: freed memory handed back after {self.trims} of {self.checks} micro-batches{need}")

    def after_micro_batch(self) -> None:
        self.checks += 1
        now = self.resident()
        if now is not None and self.fresh:
            self.need = max(self.need, now)
        if now is None or now > self.need * (1 + self.slack):
            self.hand_back()
            self.trims += 1
        else:
            self.fresh = False

    def hand_back(self) -> None:
        self.trim()
        self.fresh = True


def release_memory(trainer: Trainer, training_args, log: Callable[[str], None]) -> None:
    """--malloc_trim: on (auto: on the CPU), the ReleaseFreedMemory callback where glibc is there."""
    wanted = training_args.malloc_trim
    if wanted is None:
        wanted = training_args.device.type == "cpu"
    trim = glibc_malloc_trim() if wanted else None
    if trim is not None:
        trainer.add_callback(ReleaseFreedMemory(trim, log))
        log(
            "memory: freed memory goes back to the system when the process grows more than "
            f"{ReleaseFreedMemory.slack:.0%} past what a micro-batch needs (--malloc_trim)"
        )


class FollowMachineLoad(TrainerCallback):
    """torch's thread count set at the start of training and looked at again after every micro-batch
    (chatft.threads: fewer threads while other work keeps cores busy)."""

    def __init__(self, governor: ThreadGovernor) -> None:
        self.governor = governor

    def on_train_begin(self, args, state, control, **kwargs):
        self.governor.start()

    def on_substep_end(self, args, state, control, **kwargs):
        self.governor.tick()

    def on_step_end(self, args, state, control, **kwargs):
        self.governor.tick()

    def on_train_end(self, args, state, control, **kwargs):
        self.governor.stop()


class ReleaseDataPages(TrainerCallback):
    """At a step's end, at most every `every` seconds, the pages of the memory-mapped Arrow data read so far leave
    this process's resident memory (chatft.data.raw.release_mapped_pages): an epoch over a million examples does
    not grow the RSS by the data's size. The pages stay in the page cache."""

    every = 30.0

    def __init__(self) -> None:
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last >= self.every:
            release_mapped_pages()
            self.last = time.monotonic()


def follow_machine_load(trainer: Trainer, training_args, log: Callable[[str], None]) -> None:
    """On the CPU, the thread count chatft.threads chooses (--threads fixes it)."""
    if training_args.device.type == "cpu":
        governor = ThreadGovernor(this_process_budget(training_args.threads), log)
        trainer.add_callback(FollowMachineLoad(governor))


def process_age() -> float | None:
    """Seconds since this process started (its imports included), from the kernel's record of its start; None
    where psutil cannot tell."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a platform without it: nothing to report
        return None


class ReportStartup(TrainerCallback):
    """One line when training begins: how long the process took to get there (imports, data, model, Trainer)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_train_begin(self, args, state, control, **kwargs):
        age = process_age()
        if age is not None:
            self.log(f"training starts {age:.1f} s after the process started")


def add_process_callbacks(trainer: Trainer, training_args, log: Callable[[str], None]) -> None:
    """What runs between micro-batches for the machine's sake: memory handed back (freed memory, the data's
    mapped pages), threads fitted to the load; and a line saying when training began."""
    release_memory(trainer, training_args, log)
    trainer.add_callback(ReleaseDataPages())
    follow_machine_load(trainer, training_args, log)
    trainer.add_callback(ReportStartup(log))
