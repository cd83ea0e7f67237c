"""Watching a run as it goes: `metrics.jsonl` in the run folder, one JSON object a line, appended and flushed as
the run goes, and, when the `tensorboard` package is installed (`pip install cifarkit[tensorboard]`), TensorBoard
event files beside it, so that `tensorboard --logdir runs/` draws loss, learning rate, speed and accuracy.

    {"kind": "step", "step": 120, "epoch": 3, "loss": 0.9132, "lr": 0.0123, "lr_factor": 0.81,
     "images_per_s": 690.2, "elapsed_s": 171.2}
    {"kind": "eval", "step": 147, "epoch": 3, "accuracy": 0.8374, "loss": 0.5213, "tta": "none",
     "precision": "bf16", "final": false, "elapsed_s": 233.6}

`step` counts optimizer steps from the start of the run (a resumed run goes on counting and appends to the same
file), `loss` is the mean training loss since the previous step line, `elapsed_s` the seconds since the process
began. Lines are held back until the run's first checkpoint: a run that fails before it leaves no file, as it
leaves no folder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

JSONL_NAME = "metrics.jsonl"
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files, written by torch.utils.tensorboard


class RunLog:
    """The run's live record. Rank 0 only; `commit()` at the first checkpoint opens the files and writes what
    was held back."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = True) -> None:
        self.out_dir = out_dir
        self.tensorboard = tensorboard
        self.pending: list[dict[str, Any]] = []
        self.file: Any = None
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter, when tensorboard is installed

    def step(self, *, step: int, epoch: int, loss: float, lr: float, lr_factor: float, images_per_s: float,
             elapsed_s: float) -> None:  # fmt: skip
        self._add({
            "kind": "step", "step": step, "epoch": epoch, "loss": _num(loss, 6), "lr": _num(lr, 8),
            "lr_factor": _num(lr_factor, 6), "images_per_s": _num(images_per_s, 1), "elapsed_s": _num(elapsed_s, 3),
        })  # fmt: skip

    def evaluation(self, *, step: int, epoch: int, accuracy: float, loss: float, tta: str, precision: str,
                   final: bool, elapsed_s: float) -> None:  # fmt: skip
        self._add({
            "kind": "eval", "step": step, "epoch": epoch, "accuracy": _num(accuracy, 6), "loss": _num(loss, 6),
            "tta": tta, "precision": precision, "final": final, "elapsed_s": _num(elapsed_s, 3),
        })  # fmt: skip

    def commit(self) -> None:
        """Open metrics.jsonl for appending (and the TensorBoard writer) and write what was held back."""
        if self.file is not None:
            return
        self.file = open(self.out_dir / JSONL_NAME, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self.tensorboard:
            self.writer = _summary_writer(self.out_dir)
        for record in self.pending:
            self._write(record)
        self.pending.clear()
        self._flush()

    def close(self) -> None:
        if self.file is not None:
            self._flush()
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        self.file = self.writer = None

    def _add(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.time(), 3)
        if self.file is None:
            self.pending.append(record)
            return
        self._write(record)
        if record["kind"] == "eval":
            self._flush()

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()  # a line every progress_every steps: `tail -f` sees each as it comes (~10 us a flush)
        if self.writer is None:
            return
        step, wall = record["step"], record["time"]
        names = (
            {"loss": "train/loss", "lr": "train/learning_rate", "images_per_s": "train/images_per_s"}
            if record["kind"] == "step"
            else {"accuracy": "test/accuracy" + ("_final" if record["final"] else ""), "loss": "test/loss"}
        )
        for key, tag in names.items():
            if record[key] is not None:
                self.writer.add_scalar(tag, record[key], step, walltime=wall)

    def _flush(self) -> None:
        self.file.flush()
        if self.writer is not None:
            self.writer.flush()


def _num(value: float, digits: int) -> float | None:
    """A number for JSON: rounded; None for NaN or infinity (which JSON cannot hold)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _summary_writer(out_dir: Path) -> Any:
    """torch's TensorBoard writer on the run folder, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir), flush_secs=10)
