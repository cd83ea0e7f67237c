"""Evaluation speed: `cifar-eval` (ONNX) against `cifar-infer` on the same 10,000 real test images, in one run.

All run as subprocesses in the same invocation, interleaved, process start included:

- cifar-infer (the reference): `cifar-infer ROOT/test --model model.onnx --format csv --output FILE`, the same
  decoding pipeline and model, without the truth;
- cifar-eval:                  `cifar-eval model.onnx --data ROOT` (the report on stdout);
- cifar-eval --out:            the same, also writing report.json, predictions.csv and the three PNGs.

Prints images/s (median of --runs), the ratio to cifar-infer, peak RSS (ru_maxrss from os.wait4, as in
bench/infer_speed.py), and checks that cifar-eval's top-1 equals the accuracy of cifar-infer's predictions.
Never fails on timing.

    python bench/eval_speed.py --data $CIFARKIT_DATA --model runs/demo/model.onnx
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from infer_speed import BIN, timed  # the same wall-time and ru_maxrss measurement (bench/ is on sys.path)


def eval_command() -> list[str]:
    """The installed console script."""
    return [str(BIN / "cifar-eval")]


def infer_accuracy(path: str) -> tuple[float, int]:
    """(accuracy, rows) of a cifar-infer csv whose images sit in folders named after their class."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    hits = sum(row["label"] == Path(row["path"]).parent.name for row in rows)
    return hits / max(len(rows), 1), len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root with test/")
    p.add_argument("--model", default="runs/demo/model.onnx", help="an exported model.onnx")
    p.add_argument("--runs", type=int, default=5, help="runs of each command, interleaved (median reported)")
    args = p.parse_args()

    test_dir = Path(args.data or "") / "test"
    if not args.data or not test_dir.is_dir():
        print(
            "bench/eval_speed.py: skipped, it needs the real CIFAR-10 test images: pass --data or set CIFARKIT_DATA "
            f"to an extracted ImageFolder root holding test/ ({'not set' if not args.data else f'{test_dir} missing'})",
            file=sys.stderr,
        )
        return
    if not Path(args.model).is_file():
        print(
            f"bench/eval_speed.py: skipped, missing {args.model}. Make it with\n"
            f"    cifar-train --data {args.data} --out runs/demo && "
            "cifar-export runs/demo/checkpoint.pt --out runs/demo",
            file=sys.stderr,
        )
        return

    n_images = sum(1 for d in test_dir.iterdir() if d.is_dir() for _ in d.iterdir())
    work = Path(tempfile.mkdtemp(prefix="cifarkit-bench-eval-"))
    infer_csv, out_dir = str(work / "infer.csv"), work / "eval"
    commands = {
        "cifar-infer --format csv": [str(BIN / "cifar-infer"), str(test_dir), "--model", args.model]
        + ["--format", "csv", "--output", infer_csv, "--progress", "none"],
        "cifar-eval": [*eval_command(), args.model, "--data", args.data, "--progress", "none"],
        "cifar-eval --out": [*eval_command(), args.model, "--data", args.data, "--progress", "none"]
        + ["--out", str(out_dir)],
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for r in range(args.runs):
        for name, cmd in commands.items():
            wall, code, rss, err = timed(cmd)
            if code != 0:
                sys.exit(f"{name} failed (exit {code}): {' '.join(cmd)}\n{err}")
            results[name].append((wall, rss))
            speed = n_images / wall
            print(f"run {r + 1}/{args.runs} {name:<26} {wall:6.2f} s  {speed:8,.0f} images/s", file=sys.stderr)

    print(f"\n{n_images:,} test images in {test_dir}, {os.cpu_count()} CPU cores, {args.runs} runs each (median)")
    print(f"{'command':<28}{'wall s':>8}{'images/s':>11}{'ratio':>8}{'peak RSS':>12}")
    ips = {}
    for name in commands:
        wall = statistics.median(w for w, _ in results[name])
        ips[name] = n_images / wall
        rss = max(m for _, m in results[name]) / 1024
        ratio = ips[name] / ips["cifar-infer --format csv"]
        print(f"{name:<28}{wall:8.2f}{ips[name]:11,.0f}{ratio:7.2f}x{rss:8,.0f} MiB")

    report = json.loads((out_dir / "report.json").read_text())
    acc, rows = infer_accuracy(infer_csv)
    top1 = report["models"][0]["top1"]
    same = "same" if round(acc * rows) == report["models"][0]["correct"] else "DIFFERENT"
    print(
        f"top-1: cifar-eval {100 * top1:.2f} % of {report['images']:,}, "
        f"cifar-infer {100 * acc:.2f} % of {rows:,} ({same})"
    )


if __name__ == "__main__":
    main()
