"""Training speed: the blog's pipeline against `cifar-train`, same recipe, same data, in one run.

All run as subprocesses on the same machine in the same invocation, interleaved round by round, so their ratios
are meaningful on a noisy machine; --repeat N runs N rounds and reports medians. cifar-train runs twice a round:
cold (its decoded-image cache removed first: the run decodes every JPEG) and warm (the cache built). The table
gives, per pipeline, the median wall time of the whole process (start-up, data, training, evaluation, writes),
the median seconds per epoch, both as speed-ups over the blog's pipeline, peak RSS and test accuracy. Never
fails on timing.

    python bench/train_speed.py --data $CIFARKIT_DATA --repeat 3    # the 4-epoch recipe, three rounds
    python bench/train_speed.py --data $CIFARKIT_DATA --epochs 1    # quicker
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

HERE = Path(__file__).resolve().parent
COLD, BLOG, WARM = "cifar-train (cold cache)", "blog pipeline", "cifar-train (warm cache)"


def run(cmd: list[str], out_json: Path | None = None) -> dict:
    """One process: wall seconds, peak RSS (KiB) and what it reported (its metrics.json or its last line)."""
    wall, code, rss, err = timed(cmd, quiet=out_json is not None)
    if code != 0:
        sys.exit(f"command failed ({code}): {' '.join(cmd)}\n{err}")
    return {"wall": wall, "rss": rss, "report": json.loads(out_json.read_text()) if out_json else None}


def blog_round(args: argparse.Namespace, work: Path) -> dict:
    result = work / "blog.json"
    cmd = [sys.executable, str(HERE / "blog_train.py"), "--data", args.data, "--epochs", str(args.epochs)]
    cmd += ["--workers", str(args.blog_workers), "--result", str(result)]
    r = run(cmd, result)
    return {**r, "epoch_seconds": r["report"]["epoch_seconds"], "accuracy": r["report"]["accuracy"],
            "setup": f"DataLoader, ToTensor+Normalize, fp32, {args.blog_workers} workers"}  # fmt: skip


def cifar_round(args: argparse.Namespace, work: Path, cold: bool) -> dict:
    cache = work / "cache"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    out = work / ("cold" if cold else "warm")
    cmd = [str(Path(sys.executable).parent / "cifar-train"), "--data", args.data, "--data-dir", str(cache)]
    cmd += ["--epochs", str(args.epochs), "--out", str(out), "--overwrite", "--progress", "none"]
    r = run(cmd, out / "metrics.json")
    m = r["report"]
    setup = (f"{m['precision']}, channels_last={m['channels_last']}, threads {m['threads']}, data "
             f"{m['data_load_seconds']:.1f} s ({'cache' if m['data_from_cache'] else 'decoded'})")  # fmt: skip
    return {**r, "epoch_seconds": m["epoch_seconds"], "accuracy": m["test"]["accuracy"], "setup": setup,
            "phases": m.get("phases", {})}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root [$CIFARKIT_DATA]")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="rounds of the three runs, interleaved (medians)")
    p.add_argument("--blog-workers", type=int, default=2, help="DataLoader workers for the blog's pipeline")
    args = p.parse_args()
    if not args.data or not (Path(args.data) / "train").is_dir():
        sys.exit(
            "bench/train_speed.py needs the real data set: pass --data or set CIFARKIT_DATA to an extracted "
            "CIFAR-10 ImageFolder root (train/ and test/); see the README's 'Data' section"
        )
    work = Path(tempfile.mkdtemp(prefix="cifarkit-bench-"))
    runs: dict[str, list[dict]] = {COLD: [], BLOG: [], WARM: []}
    try:
        for r in range(args.repeat):
            for name in runs:
                print(f"round {r + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
                got = blog_round(args, work) if name == BLOG else cifar_round(args, work, cold=name == COLD)
                runs[name].append(got)
                print(f"  {got['wall']:.1f} s, {100 * got['accuracy']:.2f} %", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    def per_epoch(name: str) -> float:
        return statistics.median(statistics.median(x["epoch_seconds"]) for x in runs[name])

    ref_wall, ref_epoch = med(BLOG, "wall"), per_epoch(BLOG)
    print(
        f"\nblog recipe, {args.epochs} epoch(s), batch 32, Adam 1e-3, data {args.data}, {os.cpu_count()} CPU cores, "
        f"medians of {args.repeat} interleaved round(s)\n"
    )
    head = (f"{'pipeline':<26} {'wall s':>7} {'end to end':>10} {'s/epoch':>8} {'per epoch':>9} {'peak RSS':>9} "
            f"{'test acc':>9}  setup")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, xs in runs.items():
        wall, epoch = med(name, "wall"), per_epoch(name)
        rss = max(x["rss"] for x in xs) / 1024
        print(
            f"{name:<26} {wall:>7.1f} {ref_wall / wall:>9.2f}x {epoch:>8.2f} {ref_epoch / epoch:>8.2f}x "
            f"{rss:>6,.0f} MiB {100 * med(name, 'accuracy'):>8.2f}%  {xs[-1]['setup']}"
        )
    print("\nwall seconds of each round, and where cifar-train's time went (seconds, last round):")
    for name, xs in runs.items():
        print(f"  {name:<26} " + ", ".join(f"{x['wall']:.1f}" for x in xs))
        if "phases" in xs[-1]:
            print(f"  {'':<26} " + ", ".join(f"{k} {v:.1f}" for k, v in xs[-1]["phases"].items()))


if __name__ == "__main__":
    main()
