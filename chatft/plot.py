"""loss.png: the training (and eval) loss of a run, from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path


def loss_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss(log_history: list[dict], out_dir: Path) -> Path | None:
    """Writes out_dir/loss.png; returns its path, or None when nothing was logged."""
    train_steps, train_loss = loss_series(log_history, "loss")
    eval_steps, eval_loss = loss_series(log_history, "eval_loss")
    if not train_loss and not eval_loss:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_loss:
        ax.plot(train_steps, train_loss, label="train loss")
    if eval_loss:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
