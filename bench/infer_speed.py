"""Inference speed: the blog's evaluation loop against `cifar-infer`, end to end, on the 10,000 real test images.

Both run as subprocesses in the same invocation, interleaved, process start included (importing torch is part
of the blog's cost, as starting onnxruntime is part of ours):

- blog:        torchvision ImageFolder + DataLoader(batch 32, 2 workers) with ToTensor + Normalize(0.5, 0.5),
               the eager model rebuilt from the checkpoint, argmax per batch (this file, --child-blog);
- cifar-infer: `cifar-infer TEST_DIR --model model.onnx --format csv --output FILE`.

Prints images/s (median of --runs), the ratio, peak RSS (ru_maxrss from os.wait4: the largest process in each
tree, so the blog's DataLoader workers are not summed), accuracy, and how many of the 10,000 images both
classify the same. Then the wall time of `cifar-infer one.jpg` (median of --single-runs). Never fails on timing.

    python bench/infer_speed.py --data $CIFARKIT_DATA --checkpoint runs/demo/checkpoint.pt --model runs/demo/model.onnx

Make the checkpoint and model first (or pass --build to have this script do it, ~2 min on 2 cores):

    cifar-train --data $CIFARKIT_DATA --out runs/demo && cifar-export runs/demo/checkpoint.pt --out runs/demo
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


# Runs argv[2:] and writes its wall seconds and peak RSS (KiB) to the file argv[1]. A process started by this
# small launcher inherits little: Linux counts the memory a child had at fork (its parent's, a bench holding
# images and sessions) in the child's ru_maxrss, which would put the bench's own size into every figure.
_LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def timed(cmd: list[str], *, quiet: bool = True) -> tuple[float, int, int, str]:
    """Run `cmd`; (wall seconds, exit code, peak RSS in KiB, stderr tail). Wall time and peak RSS are measured
    by a small launcher process around `cmd` (os.wait4: the child's own ru_maxrss or its largest reaped
    descendant's), so neither the bench's memory nor the launcher's start is counted."""
    with tempfile.NamedTemporaryFile("r", prefix="cifarkit-bench-", suffix=".txt") as result:
        launcher = [sys.executable, "-c", _LAUNCHER, result.name, *map(str, cmd)]
        proc = subprocess.run(launcher, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
        wall, rss = result.read().split()
    return float(wall), proc.returncode, int(rss), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# The blog's evaluation (run in a child process)
# ---------------------------------------------------------------------------------------------------------


def child_blog(test_dir: str, checkpoint: str, out: str, workers: int, batch_size: int) -> None:
    import torch
    import torchvision
    import torchvision.transforms as transforms

    from cifarkit.model.checkpoint import Checkpoint  # only to rebuild the same network

    net = Checkpoint.load(checkpoint).model().eval()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    testset = torchvision.datasets.ImageFolder(test_dir, transform=transform)
    loader = torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=workers)
    predicted = []
    with torch.no_grad():
        for images, _ in loader:
            predicted.extend(net(images).argmax(1).tolist())
    with open(out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "index"])
        for (path, _), index in zip(testset.samples, predicted, strict=True):
            w.writerow([path, index])


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def read_predictions(path: str) -> dict[str, int]:
    with open(path, newline="") as f:
        return {os.path.abspath(row["path"]): int(row["index"]) for row in csv.DictReader(f)}


def accuracy(preds: dict[str, int], class_names: list[str]) -> float:
    hits = sum(class_names[i] == Path(p).parent.name for p, i in preds.items())
    return hits / max(len(preds), 1)


def build(data: str, folder: Path) -> tuple[Path, Path]:
    print(f"building a checkpoint and model in {folder} (cifar-train + cifar-export) ...", file=sys.stderr)
    for cmd in (
        [str(BIN / "cifar-train"), "--data", data, "--out", str(folder), "--progress", "none"],
        [str(BIN / "cifar-export"), str(folder / "checkpoint.pt"), "--out", str(folder)],
    ):
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
    return folder / "checkpoint.pt", folder / "model.onnx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root with test/")
    p.add_argument("--checkpoint", default="runs/demo/checkpoint.pt", help="checkpoint.pt for the blog's eager model")
    p.add_argument("--model", default="runs/demo/model.onnx", help="model.onnx exported from the same checkpoint")
    p.add_argument("--build", action="store_true", help="train and export into runs/bench-infer when files are missing")
    p.add_argument("--runs", type=int, default=3, help="runs of each pipeline, interleaved (median reported)")
    p.add_argument("--single-runs", type=int, default=7, help="runs of `cifar-infer one.jpg`")
    p.add_argument("--blog-workers", type=int, default=2, help="DataLoader workers (the PyTorch tutorial's 2)")
    p.add_argument("--blog-batch-size", type=int, default=32)
    p.add_argument("--batch-sizes", default="", help="also time cifar-infer at these batch sizes: 32,128")
    p.add_argument("--child-blog", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child_blog:
        child_blog(str(Path(args.data) / "test"), args.checkpoint, args.out, args.blog_workers, args.blog_batch_size)
        return

    test_dir = Path(args.data or "") / "test"
    if not args.data or not test_dir.is_dir():
        print(
            "bench/infer_speed.py: skipped, it needs the real CIFAR-10 test images: pass --data or set CIFARKIT_DATA "
            f"to an extracted ImageFolder root holding test/ ({'not set' if not args.data else f'{test_dir} missing'})",
            file=sys.stderr,
        )
        return
    checkpoint, model = Path(args.checkpoint), Path(args.model)
    if not (checkpoint.is_file() and model.is_file()):
        if args.build:
            checkpoint, model = build(args.data, Path("runs/bench-infer"))
        else:
            missing = ", ".join(str(f) for f in (checkpoint, model) if not f.is_file())
            print(
                f"bench/infer_speed.py: skipped, missing {missing}. Make them with\n"
                f"    cifar-train --data {args.data} --out runs/demo && "
                "cifar-export runs/demo/checkpoint.pt --out runs/demo\n"
                "or pass --checkpoint/--model, or --build.",
                file=sys.stderr,
            )
            return

    from cifarkit.files import default_threads
    from cifarkit.infer import DEFAULT_BATCH_SIZE, Classifier

    class_names = list(Classifier.from_file(model).labels)
    n_images = sum(1 for d in test_dir.iterdir() if d.is_dir() for _ in d.iterdir())
    # cifarkit's bytecode, as an installed package has it: with PYTHONDONTWRITEBYTECODE set (as on the
    # development machine) every start would compile cifarkit's modules again (~0.08 s of cifar-infer's start).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "src")], check=False)
    work = Path(tempfile.mkdtemp(prefix="cifarkit-bench-infer-"))
    blog_csv, infer_csv = str(work / "blog.csv"), str(work / "infer.csv")
    blog_cmd = [
        sys.executable, __file__, "--child-blog", "--data", args.data, "--checkpoint", str(checkpoint),
        "--out", blog_csv, "--blog-workers", str(args.blog_workers), "--blog-batch-size", str(args.blog_batch_size),
    ]  # fmt: skip
    infer_cmd = [str(BIN / "cifar-infer"), str(test_dir), "--model", str(model), "--format", "csv"]
    infer_cmd += ["--output", infer_csv, "--progress", "none"]

    results: dict[str, list[tuple[float, int]]] = {"blog": [], "cifar-infer": []}
    for r in range(args.runs):
        for name, cmd in (("blog", blog_cmd), ("cifar-infer", infer_cmd)):
            wall, code, rss, err = timed(cmd)
            if code != 0:
                sys.exit(f"{name} failed (exit {code}): {' '.join(cmd)}\n{err}")
            results[name].append((wall, rss))
            speed = n_images / wall
            print(f"run {r + 1}/{args.runs} {name:<12} {wall:6.2f} s  {speed:8,.0f} images/s", file=sys.stderr)

    blog, ours = read_predictions(blog_csv), read_predictions(infer_csv)
    same = sum(blog.get(path) == index for path, index in ours.items())

    print(f"\n{n_images:,} test images in {test_dir}, {os.cpu_count()} CPU cores, {args.runs} runs each (median)")
    print(f"{'pipeline':<44}{'wall s':>8}{'images/s':>11}{'peak RSS':>11}{'accuracy':>10}")
    ips = {}
    for name, label, preds in (
        ("blog", f"blog: ImageFolder+DataLoader(bs {args.blog_batch_size}, {args.blog_workers} workers)", blog),
        ("cifar-infer", f"cifar-infer (batch {DEFAULT_BATCH_SIZE}, {default_threads()} threads)", ours),
    ):
        wall = statistics.median(w for w, _ in results[name])
        rss = max(m for _, m in results[name]) / 1024
        ips[name] = n_images / wall
        print(f"{label:<44}{wall:8.2f}{ips[name]:11,.0f}{rss:8,.0f} MiB{100 * accuracy(preds, class_names):9.2f}%")
    print(f"ratio cifar-infer / blog: {ips['cifar-infer'] / ips['blog']:.2f}x images/s")
    print(f"same predicted class: {same:,} of {len(ours):,} images ({len(blog):,} from the blog pipeline)")

    for bs in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
        cmd = infer_cmd[:-2] + ["--progress", "none", "--batch-size", str(bs)]
        walls = [timed(cmd)[0] for _ in range(max(1, args.runs))]
        print(f"cifar-infer --batch-size {bs:<5} {n_images / statistics.median(walls):8,.0f} images/s")

    one = next(f for d in sorted(test_dir.iterdir()) if d.is_dir() for f in sorted(d.iterdir()))
    single = [timed([str(BIN / "cifar-infer"), str(one), "--model", str(model)]) for _ in range(args.single_runs)]
    bare = [timed([sys.executable, "-c", "pass"])[0] for _ in range(3)]
    walls = sorted(w for w, *_ in single)
    print(
        f"cifar-infer one.jpg: median {statistics.median(walls):.3f} s, min {walls[0]:.3f} s over {len(walls)} runs, "
        f"process start included (python -c pass: {statistics.median(bare):.3f} s)"
    )


if __name__ == "__main__":
    main()
