"""Recipes side by side on the machine at hand: model, epochs, seconds, images/s and test accuracy.

Each recipe runs as its own `cifar-train` process on the same data (the decoded-image cache is built first,
outside the timings), then the table is printed with the accuracy curve against time. Never fails on timing.

    python bench/recipes.py --data $CIFARKIT_DATA                      # blog and airbench (~12 min on 2 cores)
    python bench/recipes.py --data $CIFARKIT_DATA --recipes airbench --keep runs/airbench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="data source [$CIFARKIT_DATA]")
    p.add_argument("--recipes", default="blog,airbench", help="comma-separated recipe names")
    p.add_argument("--epochs", type=float, default=None, help="override every recipe's epochs")
    p.add_argument("--keep", default=None, help="keep the run folders under this folder")
    p.add_argument("extra", nargs="*", help="further cifar-train options, after --")
    args = p.parse_args()
    if not args.data:
        sys.exit(
            "bench/recipes.py needs a data set: pass --data or set CIFARKIT_DATA (an extracted CIFAR-10 "
            "ImageFolder root, or a cifar-10-batches-py folder)"
        )

    cifar_train = str(Path(sys.executable).parent / "cifar-train")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cifarkit-recipes-"))
    root.mkdir(parents=True, exist_ok=True)
    # Build the decoded-image cache first so that no recipe pays for JPEG decoding.
    from cifarkit.data import load_data

    load_data(args.data)
    rows = []
    try:
        for name in args.recipes.split(","):
            out = root / name
            cmd = [cifar_train, "--data", args.data, "--recipe", name, "--out", str(out), "--progress", "lines"]
            if args.epochs is not None:
                cmd += ["--epochs", str(args.epochs)]
            cmd += args.extra
            print(f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            m = json.loads((out / "metrics.json").read_text())
            rows.append((name, m, wall))
        print(f"\nrecipes on {os.cpu_count()} CPU cores, data {args.data}\n")
        head = (
            f"{'recipe':<10} {'model':<10} {'params':>9} {'epochs':>6} {'train s':>8} {'total s':>8} "
            f"{'images/s':>9} {'test acc':>9}  precision / TTA"
        )
        print(head)
        print("-" * len(head))
        for name, m, wall in rows:
            ips = sorted(m["images_per_second"])[len(m["images_per_second"]) // 2]
            print(
                f"{name:<10} {m['model']:<10} {m['parameters']:>9,} {m['epochs']:>6g} {sum(m['epoch_seconds']):>8.1f} "
                f"{wall:>8.1f} {ips:>9,.0f} {100 * m['test']['accuracy']:>8.2f}%  {m['precision']} / {m['tta']}"
            )
        print(
            "\naccuracy against time (test accuracy after each epoch; no TTA except the last, which uses the "
            "recipe's TTA):"
        )
        for name, m, _ in rows:
            points = [
                f"{t:.0f}s {100 * a:.2f}%"
                for t, a in zip(m["elapsed_seconds_per_epoch"], m["test_accuracy_per_epoch"], strict=True)
                if a is not None
            ]
            print(f"  {name:<10} " + ", ".join(points))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
