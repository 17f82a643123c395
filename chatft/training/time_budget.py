"""--time_budget 20m: training sized to a wall-clock time instead of a step count.

People think in time ("train for 20 minutes"), not in steps. The budget counts from the first training step
(preprocessing and model loading are not in it). How it is kept:
- until the step count is known, max_steps is PROVISIONAL (never reached);
- after step 1 the count is set from that step's time (at least MEASURE_STEPS: step 1 may be mostly a
  compile), after step MEASURE_STEPS again, and then re-planned after steps 8, 16, 32, ... (each power of two:
  steps settle as caches warm up, or drift as the machine's load changes): from the median of the steps after
  the first (step 1 carries one-time costs), the steps that fit in what is left of the budget, less the
  evaluations and saves they bring (estimated: an evaluation from the step time per example, forward only; a
  save from the bytes it writes) and one final save;
- each time, the learning-rate schedule is laid over the chosen count (warmup and decay: its functions are
  re-bound to the count, and the learning rate of the next step is set from them), so the run ends its schedule
  at its last step. Step 1's rate does not depend on the count (0 under warmup, the peak without); after a
  re-plan the later steps follow the new count's schedule (a linear decay at step k of n, re-planned to m, goes
  on from 1 - k/m of the peak instead of 1 - k/n);
- the count is final from the first save on: it is saved in every checkpoint's trainer_state.json (max_steps),
  and a resumed run takes it from there, so it continues exactly;
- should a step run so late that the next would end past the budget, training stops there and says so.
--max_steps, when also given, caps the count.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

PROVISIONAL = 10**9  # max_steps until the budget has chosen
MEASURE_STEPS = 4
SAVE_BYTES_PER_S = 200e6  # a conservative disk: what a checkpoint's write is estimated at
EVAL_SHARE = 0.4  # an evaluated example costs about this share of a trained one (forward only)
PLAN_SHARE = 0.97  # steps are planned into this share of what is left: steps vary, the budget is a limit
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "20m", "1.5h", "1h30m" (a bare number is seconds)."""
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        seconds = float(spec)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", spec)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh])", "", spec).strip():
            raise ValueError(f"--time_budget {text!r}: expected a duration such as 90s, 20m, 1.5h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"--time_budget {text!r}: must be more than zero")
    return seconds


def steps_within(
    remaining_s: float,
    done: int,
    step_s: float,
    every_eval: int | None,
    eval_s: float,
    every_save: int | None,
    save_s: float,
) -> int:
    """The most steps in all (at least `done`) whose steps after `done`, with the evaluations and saves every
    every_eval / every_save steps among them, and one final save, take no more than remaining_s."""

    def cost(total: int) -> float:
        def count(every: int | None) -> int:
            return (total // every - done // every) if every else 0

        return (total - done) * step_s + count(every_eval) * eval_s + (count(every_save) + 1) * save_s

    low, high = done, done + max(1, int(remaining_s / max(step_s, 1e-9))) + 1
    while low < high:  # the largest total whose cost fits
        mid = (low + high + 1) // 2
        if cost(mid) <= remaining_s:
            low = mid
        else:
            high = mid - 1
    return low


def next_plan_step(measured: int) -> int:
    """The number of measured steps after which the count is planned next: 1, MEASURE_STEPS, then each power
    of two."""
    if measured < 1:
        return 1
    return MEASURE_STEPS if measured < MEASURE_STEPS else 2 ** measured.bit_length()


def is_plan_step(measured: int) -> bool:
    return measured >= 1 and measured == next_plan_step(measured - 1)


def lay_schedule(scheduler, args, total: int) -> None:
    """The scheduler's functions re-bound to `total` steps (and its warmup, when given as a ratio), and the
    optimizer's learning rate for the next step set from them."""
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    warmup = args.get_warmup_steps(total)
    rebound = []
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, functools.partial) and "num_training_steps" in fn.keywords:
            keywords = fn.keywords | {"num_training_steps": total}
            if "num_warmup_steps" in keywords:
                keywords["num_warmup_steps"] = warmup
            fn = functools.partial(fn.func, *fn.args, **keywords)
        rebound.append(fn)
    scheduler.lr_lambdas = rebound
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, rebound, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


class TimeBudget(TrainerCallback):
    """Sizes the run to budget_s seconds of training (module docstring)."""

    def __init__(
        self,
        budget_s: float,
        cap: int | None,
        examples_per_step: float,
        eval_examples: int,
        save_bytes: int,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        show_total: Callable[[int], None] = lambda _steps: None,
    ) -> None:
        self.budget_s, self.cap, self.log, self.clock = budget_s, cap, log, clock
        self.show_total = show_total  # the progress bar's step count
        self.examples_per_step, self.eval_examples, self.save_bytes = (
            examples_per_step,
            eval_examples,
            save_bytes,
        )
        self.start = self.step_start = 0.0
        self.step_times: list[float] = []
        self.final = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()
        self.final = state.max_steps < PROVISIONAL  # resumed: chosen by the run that saved the checkpoint
        if self.final:
            self.log(f"--time_budget: {state.max_steps} steps, as chosen before the checkpoint")

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = self.clock()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        now = self.clock()
        self.step_times.append(now - self.step_start)
        if not self.final and is_plan_step(len(self.step_times)):
            self.choose(args, state, control, lr_scheduler)
        elif now - self.start + self.step_s() > self.budget_s and state.global_step < state.max_steps:
            control.should_training_stop = control.should_save = True
            self.log(
                f"--time_budget: stopping at step {state.global_step} of {state.max_steps}: the next step would end "
                "past the budget (steps ran slower than measured)"
            )

    def on_save(self, args, state, control, **kwargs):
        self.final = True  # a checkpoint holds the count: a resumed run must find the same one

    def step_s(self) -> float:
        later = self.step_times[1:]
        return statistics.median(later) if later else self.step_times[0]

    def choose(self, args, state, control, lr_scheduler) -> None:
        step_s = self.step_s()
        eval_every = state.eval_steps if args.eval_strategy == "steps" and self.eval_examples else None
        save_every = state.save_steps if args.save_strategy == "steps" and state.save_steps else None
        eval_s = EVAL_SHARE * step_s * self.eval_examples / max(self.examples_per_step, 1e-9)
        save_s = self.save_bytes / SAVE_BYTES_PER_S
        remaining = self.budget_s - (self.clock() - self.start)
        total = steps_within(
            PLAN_SHARE * remaining, state.global_step, step_s, eval_every, eval_s, save_every, save_s
        )
        measured = len(self.step_times)
        if measured < MEASURE_STEPS:
            # Step 1 alone (a compile, cold caches) may be many times a step: planned from it, the run would end
            # before a true step was ever measured. It goes on to step MEASURE_STEPS unless the budget guard
            # (on_step_end) finds that even the steps after the first do not fit.
            total = max(total, MEASURE_STEPS)
        if self.cap is not None:
            total = min(total, self.cap)
        total = max(total, state.global_step)
        state.max_steps = total
        self.show_total(total)
        lay_schedule(lr_scheduler, args, total)
        again = next_plan_step(measured)
        self.log(
            f"--time_budget: {total} steps ({step_s:.2f} s a step over {measured} measured"
            f"{', evaluations and saves included' if eval_every or save_every else ''}; "
            f"{self.budget_s - remaining:.0f} s of {self.budget_s:.0f} s used)"
            + (f"; measured again after step {again}" if again <= total else "")
        )
        if total <= state.global_step:
            control.should_training_stop = control.should_save = True


def checkpoint_max_steps(checkpoint: str | None) -> int | None:
    """The step count a time-budgeted run chose, from the checkpoint it resumes from."""
    if not checkpoint:
        return None
    try:
        steps = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and steps < PROVISIONAL else None


def add_time_budget(trainer, training_args, resume: str | None, log: Callable[[str], None]) -> None:
    """--time_budget: max_steps provisional (or as the checkpoint resumed from chose), and the TimeBudget callback.
    The step is counted in rows (packed or not; pairs for preference stages), evaluations in eval rows."""
    if not training_args.time_budget:
        return
    cap = training_args.max_steps if training_args.max_steps > 0 else None
    training_args.max_steps = checkpoint_max_steps(resume) or PROVISIONAL
    model = trainer.model
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    callback = TimeBudget(
        parse_duration(training_args.time_budget),
        cap,
        examples_per_step=rows * max(1, training_args.world_size),
        eval_examples=len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        save_bytes=3 * trainable,  # the trainable weights and Adam's two moments
        log=log,
        show_total=lambda steps: progress_bar_total(trainer, steps),
    )
    put_first(trainer.callback_handler, callback)


def put_first(handler, callback: TrainerCallback) -> None:
    """callback ahead of every other, transformers' DefaultFlowCallback included: at the end of step max_steps that
    one tells the Trainer to stop, so a re-plan at that very step (4, 8, 16, ...) that raises the count must come
    first, or the run stops at the old count with its schedule cut short."""
    handler.callbacks.insert(0, callback)


def progress_bar_total(trainer, steps: int) -> None:
    """The training progress bar's total set to the chosen step count (it showed the provisional one, and an ETA
    of years)."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.total = steps
            bar.refresh()
