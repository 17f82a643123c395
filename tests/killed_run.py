"""finetune.py in a process that SIGKILLs itself at the end of one step, after the checkpoints saved up to then
and before that step's own save or log: a run cut by a crash or the out-of-memory killer, for the resume tests.

python tests/killed_run.py STEP [finetune.py arguments...]     (tests call run_killed(STEP, argv))
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repository
from chatft.training import stages  # noqa: E402
from chatft.training.trainer import ChatTrainer  # noqa: E402


def run_killed(step: int, argv: list[str]) -> None:
    """finetune.py argv in a process of its own, killed at the end of `step`; its output shown if it was not.
    argv must fix the thread count (--threads), as the runs it is compared with must: fp32 sums in another order
    drift past the tests' tolerance over a few steps at lr 1e-2, and an adaptive count follows the machine's load
    (a session fixture of the serving tests once left pytest on one thread where the child took two)."""
    assert "--threads" in argv, "give --threads to the killed run and to the runs it is compared with"
    r = subprocess.run(
        [sys.executable, __file__, str(step), *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]


class KillAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at(trainer_class: type, step: int) -> None:
    init = trainer_class.__init__

    def init_with_kill(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KillAtStep(step))

    trainer_class.__init__ = init_with_kill


if __name__ == "__main__":
    step, argv = int(sys.argv[1]), sys.argv[2:]
    kill_at(ChatTrainer, step)
    if "grpo" in argv:  # TRL's GRPOTrainer, subclassed by chatft.training.grpo
        from trl import GRPOTrainer

        kill_at(GRPOTrainer, step)
    elif "--stage" in argv:  # preference tuning: TRL's trainers, with chatft's PreferenceTrainer mixed in
        from chatft.training.preference_trainer import PreferenceTrainer

        kill_at(PreferenceTrainer, step)
    sys.exit(stages.main(argv))
