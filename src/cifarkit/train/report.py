"""What a run leaves for people to read: the records of its epochs and test evaluations, metrics.json (the
summary) and loss.png (the curve), written atomically.

    summary = report.summary(history, metrics, facts)
    report.write_metrics(out_dir, summary); report.plot_loss(losses, out_dir / "loss.png", steps_per_epoch=1563)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit import atomic


@dataclass
class Metrics:
    accuracy: float  # fraction correct in [0, 1]
    loss: float  # mean cross-entropy
    per_class: dict[str, float]  # class name -> accuracy in [0, 1]
    count: int  # images evaluated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    """One completed epoch: what the checkpoint's history, metrics.json and the reporter all read."""

    epoch: int  # epochs completed, counting this one (1-based)
    losses: list[float]  # training loss of every batch (mean per image)
    seconds: float  # training time of the epoch, evaluation excluded
    images_per_second: float  # training images (all ranks) / seconds
    test_accuracy: float | None = None  # None: not evaluated after this epoch
    test_loss: float | None = None
    tta: str = "none"  # test-time augmentation of that evaluation
    elapsed: float = 0.0  # seconds of training and evaluation since the run began (over resumes)


def summary(history: Sequence[EpochRecord], test: Metrics, facts: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content: `facts` about the run (recipe, data, device, versions, ...), the final test
    metrics, and the curves over every epoch of `history` (over resumes too)."""
    return {
        **facts,
        "test": test.to_dict(),
        "loss_per_batch": [loss for r in history for loss in r.losses],
        "epoch_seconds": [r.seconds for r in history],
        "images_per_second": [r.images_per_second for r in history],
        "test_accuracy_per_epoch": [r.test_accuracy for r in history],
        "elapsed_seconds_per_epoch": [r.elapsed for r in history],
    }


def write_metrics(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss(losses: Sequence[float], path: Path, *, steps_per_epoch: int) -> None:
    """loss.png: the loss of every batch and a smoothed curve, epochs marked. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.6, label="loss per batch")
    # A window of 1/20 epoch (at least 10 steps), but never more than a tenth of the run: a short run (a tight
    # --time-budget: tens of steps) would otherwise show a curve that lags its own data by many steps.
    window = max(1, min(max(10, steps_per_epoch // 20), len(losses) // 10))
    ax.plot(steps, smooth(losses, window), color="#08519c", linewidth=1.8, label="smoothed")
    for e in range(steps_per_epoch, len(losses), steps_per_epoch):
        ax.axvline(e, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xlabel("batch (optimizer step)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
