"""`cifar-train`: fit a model on CIFAR-10 (or an ImageFolder) and leave a run folder.

cifar-train --data ~/data/cifar10-jpeg --out runs/blog

Options come from cifarkit.train.config.TrainConfig and are checked before torch is imported. Progress goes to
stdout (the blog's lines in a log, a bar on a terminal), then the overall and per-class test accuracy.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any

from cifarkit.cli import EXIT_OK, console
from cifarkit.cli.progress import run_reported
from cifarkit.cli.shell import Command, Progress
from cifarkit.train.config import TrainConfig
from cifarkit.train.events import EVENTS_GLOB


def run(cfg: TrainConfig, opts: Progress) -> int:
    from cifarkit.train.budget import process_start
    from cifarkit.train.run import train

    cfg = replace(cfg, budget_start=process_start())  # a budget counts the whole process, imports included
    mode = opts.progress if os.environ.get("RANK", "0") == "0" else "none"  # under torchrun only rank 0 talks
    result, _ = run_reported(train, cfg, mode, debug=opts.debug, info=sys.stdout)
    if result.rank == 0:
        print_result(result)
    return EXIT_OK


def print_result(result: Any) -> None:
    m = result.metrics
    print(f"\nAccuracy of the network on the {m.count} test images: {100 * m.accuracy:.2f} %")
    width = max(len(c) for c in m.per_class)
    print(f"{'class':<{width}}  accuracy")
    for name, acc in m.per_class.items():
        print(f"{name:<{width}}  {100 * acc:6.2f} %")
    secs = result.epoch_seconds
    if secs:
        print(
            f"\n{len(secs)} epoch(s) on {result.device} ({result.precision}, channels_last="
            f"{'on' if result.channels_last else 'off'}): median {sorted(secs)[len(secs) // 2]:.2f} s/epoch, "
            f"{result.images_per_second:,.0f} images/s"
        )
    fitted = result.summary.get("time_budget")
    if fitted:
        print(
            f"time budget {fitted['seconds']:g} s: {result.summary['steps']:,} steps ({result.summary['epochs']} "
            f"epochs; {fitted['planned_steps']:,} planned after the warm-up, re-fitted {len(fitted['fits']) - 1} "
            f"time(s)), {result.summary['total_seconds']:.1f} s at the last write"
        )
    events = any(result.out_dir.glob(EVENTS_GLOB))
    watch = ", TensorBoard events" if events else ""
    print(f"run folder: {result.out_dir}  (checkpoint.pt, metrics.json, loss.png, metrics.jsonl{watch})")


COMMAND = Command(
    "cifar-train",
    TrainConfig,
    run,
    extras=Progress,
    help="Train a CNN on CIFAR-10 (the blog's recipe by default) and write a run folder: prints progress, then "
    "the overall and per-class test accuracy.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
