"""Training speed: the blog's pipeline against `cifar-train`, same recipe, same data, one run.

Both run as subprocesses on the same machine in the same invocation, so their ratio is meaningful even on a
noisy machine. cifar-train runs twice: cold (empty decoded-image cache: includes decoding every JPEG) and
warm (cache built). Prints a table; never fails on timing.

    python bench/train_speed.py --data $CIFARKIT_DATA            # the full 4-epoch recipe (~4-5 min on 2 cores)
    python bench/train_speed.py --data $CIFARKIT_DATA --epochs 1 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root [$CIFARKIT_DATA]")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--blog-workers", type=int, default=2, help="DataLoader workers for the blog's pipeline")
    args = p.parse_args()
    if not args.data or not (Path(args.data) / "train").is_dir():
        sys.exit(
            "bench/train_speed.py needs the real data set: pass --data or set CIFARKIT_DATA to an extracted "
            "CIFAR-10 ImageFolder root (train/ and test/); see the README's 'Data' section"
        )

    bin_dir = Path(sys.executable).parent
    cifar_train = str(bin_dir / "cifar-train")
    work = Path(tempfile.mkdtemp(prefix="cifarkit-bench-"))
    rows = []
    try:
        env = dict(os.environ, CIFARKIT_CACHE=str(work / "cache"))
        results = {}
        for name in ("cifar-train (cold cache)", "blog pipeline", "cifar-train (warm cache)"):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name == "blog pipeline":
                wall, out = run(
                    [
                        sys.executable,
                        str(HERE / "blog_train.py"),
                        "--data",
                        args.data,
                        "--epochs",
                        str(args.epochs),
                        "--workers",
                        str(args.blog_workers),
                    ]
                )
                res = json.loads(out.strip().splitlines()[-1])
                results[name] = {
                    "wall": wall,
                    "epoch_seconds": res["epoch_seconds"],
                    "accuracy": res["accuracy"],
                    "setup": f"DataLoader, ToTensor+Normalize, fp32, {args.blog_workers} workers",
                }
            else:
                out_dir = work / name.split()[1].strip("()")
                wall, _ = run(
                    [
                        cifar_train,
                        "--data",
                        args.data,
                        "--epochs",
                        str(args.epochs),
                        "--out",
                        str(out_dir),
                        "--progress",
                        "none",
                    ],
                    env=env,
                )
                m = json.loads((out_dir / "metrics.json").read_text())
                results[name] = {
                    "wall": wall,
                    "epoch_seconds": m["epoch_seconds"],
                    "accuracy": m["test"]["accuracy"],
                    "setup": f"{m['precision']}, channels_last={m['channels_last']}, "
                    f"data {m['data_load_seconds']:.1f} s "
                    f"({'cache' if m['data_from_cache'] else 'decoded'})",
                }
        ref = statistics.median(results["blog pipeline"]["epoch_seconds"])
        print(
            f"\nblog recipe, {args.epochs} epoch(s), batch 32, Adam 1e-3, data {args.data}, "
            f"{os.cpu_count()} CPU cores\n"
        )
        header = f"{'pipeline':<26} {'s/epoch (median)':>17} {'speed-up':>9} {'wall s':>8} {'test acc':>9}  setup"
        print(header)
        print("-" * len(header))
        for name, r in results.items():
            med = statistics.median(r["epoch_seconds"])
            rows.append((name, med, ref / med, r["wall"], r["accuracy"], r["setup"]))
            print(
                f"{name:<26} {med:>17.2f} {ref / med:>8.2f}x {r['wall']:>8.1f} {100 * r['accuracy']:>8.2f}%  "
                f"{r['setup']}"
            )
        print("\nper-epoch seconds:")
        for name, r in results.items():
            print(f"  {name:<26} " + ", ".join(f"{s:.2f}" for s in r["epoch_seconds"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
