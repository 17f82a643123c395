"""--time_budget: durations, the step count that fits, the schedule laid over it, a fake clock, and real runs: a
budget capped by --max_steps trains exactly as --max_steps alone, a killed budgeted run resumes exactly, and a
real budget ends its schedule at its last step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from killed_run import run_killed
from toy import many_chats, openai_jsonl, save_tiny_model
from transformers import TrainerControl, TrainerState, TrainingArguments, get_scheduler
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from chatft.training.stages import main
from chatft.training.time_budget import (
    PROVISIONAL,
    TimeBudget,
    lay_schedule,
    parse_duration,
    put_first,
    steps_within,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("1h30m", 5400), ("45", 45), (" 2 m ", 120)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "20x", "m", "0s", "1h 30 minutes", "-5m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="--time_budget"):
        parse_duration(text)


def test_the_steps_that_fit():
    assert steps_within(100, 0, 2.0, None, 0.0, None, 0.0) == 50
    # a save every 10 steps and one at the end, 1 s each: 47 steps = 94 s + 4 saves + 1 final = 99 s
    assert steps_within(100, 0, 2.0, None, 0.0, 10, 1.0) == 47
    # evaluations every 5 steps of 3 s: 39 steps = 78 s + 7 x 3 s = 99 s; 40 steps = 80 s + 8 x 3 s = 104 s
    assert steps_within(100, 0, 2.0, 5, 3.0, None, 0.0) == 39
    # 10 steps done, 20 s left at 2 s a step: 10 more
    assert steps_within(20, 10, 2.0, None, 0.0, None, 0.0) == 20
    assert steps_within(1, 10, 2.0, None, 0.0, None, 0.0) == 10  # nothing more fits


def optimizer_and_args(warmup):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    return optimizer, TrainingArguments(output_dir="unused", warmup_steps=warmup, report_to="none")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3, 0.1])
def test_the_schedule_is_laid_over_the_chosen_count(kind, warmup):
    optimizer, args = optimizer_and_args(warmup)
    provisional = get_scheduler(kind, optimizer, args.get_warmup_steps(PROVISIONAL), PROVISIONAL)
    optimizer.step()
    provisional.step()  # step 1 done on the provisional schedule
    lay_schedule(provisional, args, 30)
    fresh_optimizer, _ = optimizer_and_args(warmup)
    fresh = get_scheduler(kind, fresh_optimizer, args.get_warmup_steps(30), 30)
    fresh_optimizer.step()
    fresh.step()
    for _ in range(29):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            fresh_optimizer.param_groups[0]["lr"], abs=1e-12
        )
        optimizer.step(), provisional.step(), fresh_optimizer.step(), fresh.step()
    assert provisional.last_epoch == 30 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def budget_run(step_times, save_after=None):
    """A TimeBudget of 100 s on a fake clock, registered as add_time_budget does, beside the Trainer's own flow
    callback (which stops the run at the end of step max_steps), fed steps of these durations until the run is
    told to stop (a save after step save_after): the max_steps after each step, the log lines, and the pieces to
    go on with."""
    clock, lines = Clock(), []
    budget = TimeBudget(
        100, None, examples_per_step=4, eval_examples=0, save_bytes=0, log=lines.append, clock=clock
    )
    handler = CallbackHandler([DefaultFlowCallback()], None, None, None, None)
    put_first(handler, budget)
    args = TrainingArguments(output_dir="unused", report_to="none", save_strategy="no", logging_strategy="no")
    state, control = TrainerState(max_steps=PROVISIONAL), TrainerControl()
    handler.on_train_begin(args, state, control)
    counts = []
    for step_time in step_times:
        handler.on_step_begin(args, state, control)
        clock.now += step_time
        state.global_step += 1
        handler.on_step_end(args, state, control)
        if state.global_step == save_after:
            handler.on_save(args, state, control)
        counts.append(state.max_steps)
        if control.should_training_stop:
            break
    return counts, lines, (handler, clock, args, state, control)


def test_the_count_is_measured_then_corrected():
    counts, lines, pieces = budget_run([10.0] + [2.0] * 5)  # a slow first step (one-time costs), then 2 s
    handler, clock, args, state, control = pieces
    # after step 1: 97% of 90 s left at 10 s a step = 1 + 8; after step 4: 97% of 84 s at 2 s = 4 + 40
    assert counts == [9, 9, 9, 44, 44, 44]
    assert lines[0].startswith("--time_budget: 9 steps (10.00 s a step over 1 measured")
    assert lines[1].startswith("--time_budget: 44 steps (2.00 s a step over 4 measured")
    assert lines[1].endswith("measured again after step 8")
    assert len(lines) == 2 and not control.should_training_stop
    clock.now += 200  # the machine got very slow: the next step would end past the budget
    handler.on_step_begin(args, state, control)
    state.global_step += 1
    handler.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save and "stopping at step 7 of 44" in lines[-1]


def test_a_re_plan_at_the_last_planned_step_goes_on_to_the_new_count():
    """Step 1 is mostly a compile (--torch_compile: 87 s of a 240 s budget on the Intel Xeon): planned from it
    alone nothing more fits, yet steps 2-4 run, and the re-plan at step 4, the last planned step, carries the run
    on (the Trainer's flow callback would stop it there if it came first)."""
    counts, lines, _ = budget_run([80.0] + [2.0] * 20)
    # after step 4: 97% of the 14 s left at 2 s a step = 4 + 6; after step 8: 97% of 6 s = 8 + 2; then it ends
    assert counts == [4, 4, 4, 10, 10, 10, 10, 10, 10, 10]
    assert lines[0].startswith("--time_budget: 4 steps (80.00 s a step over 1 measured")
    assert lines[0].endswith("measured again after step 4")


def test_steps_that_speed_up_are_re_planned_at_each_power_of_two_until_the_budget_is_spent():
    counts, lines, _ = budget_run([10.0] + [2.0] * 5 + [1.0] * 79)  # the steps settle at half the time
    # step 8: 22 s used, the median of steps 2-8 still 2 s: 8 + 97% of 78 / 2 = 45; step 16: 30 s used, steps
    # 2-16 mostly 1 s: 16 + 97% of 70 = 83; step 32: 32 + 97% of 54 = 84; step 64: 64 + 97% of 22 = 85
    assert [counts[i - 1] for i in (1, 4, 8, 16, 32, 64, 85)] == [9, 44, 45, 83, 84, 85, 85]
    assert len(lines) == 6 and lines[-1].startswith("--time_budget: 85 steps (1.00 s a step over 64 measured")
    assert not lines[-1].endswith("measured again after step 128")  # no plan after the last step


def test_a_save_makes_the_count_final():
    counts, lines, _ = budget_run([10.0] + [2.0] * 5 + [1.0] * 30, save_after=6)
    assert counts[-1] == 44 and len(lines) == 2  # the checkpoint of step 6 holds 44: a resume must find it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    save_tiny_model(root / "m")
    (root / "many.jsonl").write_text(openai_jsonl(many_chats(24)))
    return str(root / "m"), str(root / "many.jsonl")


def argv_for(setup, out, *extra) -> list[str]:
    model, data = setup
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", str(out), "--logging_steps", "1",
            "--report_to", "none", "--precision", "fp32", "--method", "full", "--per_device_train_batch_size", "10",
            "--max_seq_length", "96", "--learning_rate", "1e-2", "--warmup_steps", "0.25", *extra]  # fmt: skip


def history(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_a_budget_capped_by_max_steps_trains_as_max_steps_alone_and_resumes_exactly(setup, tmp_path):
    plain, budgeted, killed = tmp_path / "plain", tmp_path / "budgeted", tmp_path / "killed"
    common = ["--max_steps", "8", "--save_steps", "4", "--threads", "1"]
    assert main(argv_for(setup, plain, *common)) == 0
    assert main(argv_for(setup, budgeted, *common, "--time_budget", "1h")) == 0
    run_killed(5, argv_for(setup, killed, *common, "--time_budget", "1h"))
    assert (
        main(argv_for(setup, killed, *common, "--time_budget", "1h", "--resume_from_checkpoint", "auto")) == 0
    )
    a, b, c = history(plain), history(budgeted), history(killed)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [h["step"] for h in c] == list(range(1, 9))
    for other in (b, c):
        assert [h["loss"] for h in other] == pytest.approx([h["loss"] for h in a], abs=1e-6)
        assert [h["learning_rate"] for h in other] == pytest.approx(
            [h["learning_rate"] for h in a], abs=1e-12
        )


def test_a_real_budget_ends_its_schedule_at_its_last_step(setup, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(argv_for(setup, out, "--time_budget", "12s", "--save_strategy", "no")) == 0
    captured = capsys.readouterr()
    log = captured.out
    assert "--time_budget:" in log and "steps (" in log
    state = json.loads((out / "trainer_state.json").read_text())
    steps, lrs = state["global_step"], [h["learning_rate"] for h in history(out)]
    assert 4 <= steps <= state["max_steps"] < PROVISIONAL
    assert f"{steps}/{state['max_steps']} [" in captured.err  # the progress bar counts the chosen steps
    end = state["log_history"][-1]
    # the rows of the steps run (at most the 10 examples of a step each), not of the provisional count the
    # Trainer planned at the start
    assert 0 < end["train_samples_per_second"] * end["train_runtime"] <= steps * 10 * 1.01
    if "stopping at step" not in log:  # unless the machine slowed down past the plan (then it says so)
        assert steps == state["max_steps"]
        assert lrs[-1] < 0.1 * max(lrs)  # decayed to (about) zero at the last step, not cut off at full rate


def test_a_resumed_run_keeps_the_count_of_its_checkpoint(tmp_path):
    from chatft.training.time_budget import add_time_budget

    checkpoint = tmp_path / "checkpoint-20"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"max_steps": 37, "global_step": 20}))
    callbacks = []
    trainer = SimpleNamespace(
        model=torch.nn.Linear(2, 2), eval_dataset=None, callback_handler=SimpleNamespace(callbacks=callbacks)
    )
    args = SimpleNamespace(
        time_budget="1m",
        max_steps=-1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        world_size=1,
    )
    add_time_budget(trainer, args, str(checkpoint), log=lambda _: None)
    assert args.max_steps == 37
    fresh = SimpleNamespace(**{**vars(args), "max_steps": -1})
    add_time_budget(trainer, fresh, None, log=lambda _: None)
    assert fresh.max_steps == PROVISIONAL and len(callbacks) == 2
    # the callback of the resumed run measures its first steps but does not choose again
    budget = callbacks[-1]  # each was put first: [fresh, resumed]
    state = SimpleNamespace(max_steps=37, global_step=20)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    budget.on_train_begin(None, state, control)
    for _ in range(4):
        budget.on_step_begin(None, state, control)
        state.global_step += 1
        budget.on_step_end(None, state, control)
    assert state.max_steps == 37 and not control.should_training_stop
