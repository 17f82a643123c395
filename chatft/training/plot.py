"""loss.png: the training (and eval) loss of a run, from the Trainer's log history; for preference tuning also the
rewards of the chosen and rejected replies, their margin and the reward accuracy; for GRPO each reward function's
mean reward and the total."""

from __future__ import annotations

from pathlib import Path

REWARDS = (
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
    ("rewards/margins", "margin"),
)
ACCURACY = "rewards/accuracies"


def loss_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def reward_keys(log_history: list[dict]) -> list[tuple[str, str]]:
    """(log key, label) of the rewards a run logged: preference tuning's, or GRPO's per function and total."""
    per_function = sorted(
        {k for e in log_history for k in e if k.startswith("rewards/") and k.endswith("/mean")}
    )
    keys = list(REWARDS) + [(k, f"{k.split('/')[1]} reward") for k in per_function]
    return keys + ([("reward", "total reward")] if per_function else [])


def plot_loss(log_history: list[dict], out_dir: Path) -> Path | None:
    """Writes out_dir/loss.png; returns its path, or None when nothing was logged."""
    train_steps, train_loss = loss_series(log_history, "loss")
    eval_steps, eval_loss = loss_series(log_history, "eval_loss")
    if not train_loss and not eval_loss:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [(label, *loss_series(log_history, key)) for key, label in reward_keys(log_history)]
    rewards = [r for r in rewards if r[2]]
    fig, axes = plt.subplots(
        2 if rewards else 1, 1, figsize=(7, 7 if rewards else 4), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    if train_loss:
        ax.plot(train_steps, train_loss, label="train loss")
    if eval_loss:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        ax = axes[1][0]
        for label, steps, values in rewards:
            ax.plot(steps, values, label=label)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        steps, accuracy = loss_series(log_history, ACCURACY)
        if accuracy:
            twin = ax.twinx()
            twin.plot(steps, accuracy, ":", color="gray", label="reward accuracy")
            twin.set_ylim(-0.05, 1.05)
            twin.set_ylabel("reward accuracy")
            twin.legend(loc="lower right")
        ax.legend(loc="upper left")
    axes[-1][0].set_xlabel("step")
    path = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
