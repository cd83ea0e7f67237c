"""The `sprint` recipe against itself with one choice undone at a time, at the same time budget, in one run.

Every choice the recipe keeps (cifarkit/train/recipes.py) is measured against the one it replaced: each row
trains `cifar-train --time-budget BUDGET` with the recipe as shipped except for that one choice, as its own
process, on the same data (decoded-image cache built first), one after another. The table gives test accuracy,
the difference to the recipe as shipped, steps and epochs the budget allowed, images/s, and the process's wall
seconds. One run of each: differences under ~0.2 points are within run-to-run noise (see --seeds). Never fails on
timing.

    python bench/sprint_ablation.py --data $CIFARKIT_DATA --budget 6m
    python bench/sprint_ablation.py --data $CIFARKIT_DATA --budget 3m --only sprint,no-muon
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from infer_speed import timed  # wall time and peak RSS of a subprocess, measured by a small launcher

# name -> (recipe fields that differ from sprint's, what the row undoes)
ABLATIONS: dict[str, tuple[dict, str]] = {
    "sprint": ({}, "the recipe as shipped"),
    "no-muon": (
        {
            "optimizer": "sgd_nesterov",
            "lr": 11.5,
            "momentum": 0.85,
            "weight_decay": 0.0153,
            "bias_lr_scale": 64.0,
            "schedule": (0.2, 0.23, 0.07),
            "lookahead_every": 5,
        },
        "airbench's Nesterov SGD, triangle schedule and lookahead instead of Muon for the filters",
    ),  # fmt: skip
    "progressive": (
        {"progressive": ((0.25, 16), (0.5, 24))},
        "progressive resizing, measured and not kept: the first quarter of the steps at 16x16, the next at 24x24",
    ),
    "batch-2000": ({"batch_size": 2000}, "airbench94_muon's batch of 2,000 instead of 1,000"),
    "no-label-smoothing": ({"label_smoothing": 0.0}, "plain cross-entropy instead of label smoothing 0.2"),
    "tta-hflip": ({"tta": "hflip"}, "a 2-pass final TTA instead of the 6-pass one"),
}

TRAIN_IMAGES: dict[str, int] = {}  # data source -> training images, for epochs

# Runs in the child: registers the variant under the name "ablation", then is cifar-train.
_CHILD = """
import json, sys
from dataclasses import replace
from cifarkit.train.recipes import RECIPES
fields = json.loads(sys.argv[1])
fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
          for k, v in fields.items()}
RECIPES["ablation"] = replace(RECIPES["sprint"], name="ablation", **fields)
from cifarkit.cli.train import main
sys.exit(main(["--recipe", "ablation", *sys.argv[2:]]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="data source [$CIFARKIT_DATA]")
    p.add_argument("--budget", default="6m", help="cifar-train --time-budget of every row")
    p.add_argument("--only", default="", help="comma-separated rows (default: all): " + ", ".join(ABLATIONS))
    p.add_argument("--seeds", type=int, default=1, help="runs of each row with seeds 0..N-1 (median accuracy)")
    p.add_argument("--keep", default=None, help="keep the run folders under this folder")
    args = p.parse_args()
    if not args.data:
        sys.exit("bench/sprint_ablation.py needs a data set: pass --data or set CIFARKIT_DATA")
    rows = [r for r in (args.only.split(",") if args.only else ABLATIONS) if r]
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ABLATIONS)}")
    from cifarkit.data import load_data

    TRAIN_IMAGES[args.data] = len(load_data(args.data).train_y)  # the cache first: no run pays for decoding
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cifarkit-ablation-"))
    results: dict[str, list[dict]] = {}
    try:
        for seed in range(args.seeds):
            for name in rows:
                out = root / f"{name}-seed{seed}"
                fields = json.dumps(ABLATIONS[name][0])
                cmd = [sys.executable, "-c", _CHILD, fields, "--data", args.data, "--time-budget", args.budget,
                       "--out", str(out), "--overwrite", "--progress", "none", "--seed", str(seed)]  # fmt: skip
                print(f"{name} (seed {seed}) ...", file=sys.stderr, flush=True)
                wall, code, rss, err = timed(cmd)
                if code != 0:  # reported in the table; the other rows go on
                    print(f"  failed ({code}): {err.strip().splitlines()[-1] if err.strip() else ''}", file=sys.stderr)
                    continue
                m = json.loads((out / "metrics.json").read_text())
                results.setdefault(name, []).append({"wall": wall, "rss": rss, "m": m})
                print(f"  {100 * m['test']['accuracy']:.2f} % in {wall:.1f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, rows, results)


def report(args: argparse.Namespace, rows: list[str], results: dict[str, list[dict]]) -> None:
    def acc(name: str) -> float:
        return statistics.median(r["m"]["test"]["accuracy"] for r in results[name])

    failed = [name for name in rows if name not in results]
    rows = [name for name in rows if name in results]
    ref = acc("sprint") if "sprint" in results else None
    print(f"\nsprint ablation, --time-budget {args.budget}, {os.cpu_count()} CPU cores, data {args.data}, "
          f"{args.seeds} seed(s) (median)\n")  # fmt: skip
    head = f"{'row':<20} {'test acc':>9} {'vs sprint':>9} {'steps':>6} {'epochs':>7} {'images/s':>9} {'wall s':>7}"
    head += "  undoes"
    print(head)
    print("-" * len(head))
    for name in rows:
        last = results[name][-1]
        m = last["m"]
        ips = statistics.median(m["images_per_second"])
        diff = f"{100 * (acc(name) - ref):+.2f}" if ref is not None else "-"
        epochs = m["steps"] * m["train_config"]["batch_size"] / TRAIN_IMAGES.get(args.data, 50_000)
        print(
            f"{name:<20} {100 * acc(name):>8.2f}% {diff:>9} {m['steps']:>6} {epochs:>7.2f} {ips:>9,.0f} "
            f"{statistics.median(r['wall'] for r in results[name]):>7.1f}  {ABLATIONS[name][1]}"
        )
    if failed:
        print(f"\nfailed (see above): {', '.join(failed)}")
    print("\nfinal evaluation of each (TTA, precision):",
          ", ".join(f"{n}: {results[n][-1]['m']['tta']}/{results[n][-1]['m'].get('final_precision', 'fp32')}"
                    for n in rows))  # fmt: skip


if __name__ == "__main__":
    main()
