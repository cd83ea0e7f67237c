"""Compact artifacts: every variant of a model (fp32, fp16, int8, each with the test-time augmentations asked for)
against the fp32 artifact with the recipe's augmentation, measured in the same run.

For each `--model NAME=CHECKPOINT`, the variants are made by `cifar-export` itself (subprocesses: the same
calibration, verification and files a user gets; `--max-drop 100` so that every variant is written and the table
can show the ones the default gate of 0.5 points would refuse). Then, for each artifact:

- size of model.onnx;
- accuracy on the 10,000 test images, from `cifar-infer`'s predictions (the product's decoding path);
- model-only images/s: one onnxruntime session (default options, CPU), a batch of 256 real test images, the
  median of --repeats timed calls after a warm-up, variants interleaved;
- end-to-end images/s: `cifar-infer TEST_DIR --model ... --format csv --output FILE`, process start included, the
  median of --runs interleaved runs;
- both speeds as a ratio against the reference (fp32, the recipe's TTA) of the same model in the same run.

Never fails on timing.

    python bench/artifacts.py --data $CIFARKIT_DATA --model blog=runs/blog/checkpoint.pt \
        --model airbench=runs/air/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval_speed import infer_accuracy  # accuracy of a cifar-infer csv over class-named folders
from infer_speed import BIN, timed  # wall time and ru_maxrss of a subprocess (bench/ is on sys.path)

PRECISIONS = ("fp32", "fp16", "int8")
GATE = 0.5  # cifar-export's default --max-drop, for the "gate" column
SPEED_BATCH = 256


def export_variant(checkpoint: str, out: Path, precision: str, tta: str, data: str) -> tuple[dict, float]:
    """Run cifar-export for one variant into `out`; returns model.json and the export's wall seconds."""
    cmd = [str(BIN / "cifar-export"), checkpoint, "--format", "onnx", "--out", str(out), "--no-speed"]
    cmd += ["--tta", tta, "--data", data, "--progress", "none"]
    if precision == "int8":
        cmd += ["--quantize", "int8"]
    elif precision == "fp16":
        cmd += ["--precision", "fp16"]
    if precision != "fp32" or tta != "recipe":
        cmd += ["--max-drop", "100"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"cifar-export failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr}{proc.stdout}")
    return json.loads((out / "model.json").read_text()), wall


def model_only_speeds(paths: dict[str, Path], images, repeats: int) -> dict[str, float]:
    """images/s of each model at batch 256: sessions built once, calls interleaved over the models."""
    import numpy as np
    import onnxruntime as ort

    batch = np.ascontiguousarray(np.resize(images, (SPEED_BATCH, *images.shape[1:])))
    sessions = {}
    for key, path in paths.items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sessions[key] = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        sessions[key].run(None, {"images": batch})  # warm-up: allocations, kernel selection
    times: dict[str, list[float]] = {key: [] for key in paths}
    for _ in range(repeats):
        for key, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {"images": batch})
            times[key].append(time.perf_counter() - t0)
    return {key: SPEED_BATCH / statistics.median(ts) for key, ts in times.items()}


def test_images(data: str):
    """The test split as uint8 [N, 32, 32, 3] (cifarkit's loader and cache)."""
    from cifarkit.data import load_data

    return load_data(data).test_x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root with train/ and test/")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT", help="a checkpoint (repeat)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="comma-separated: fp32, fp16, int8")
    p.add_argument("--tta", default="recipe,none,hflip", help="comma-separated --tta values (recipe, none, hflip)")
    p.add_argument("--runs", type=int, default=3, help="end-to-end cifar-infer runs of each artifact (median)")
    p.add_argument("--repeats", type=int, default=20, help="model-only timed calls of each artifact (median)")
    p.add_argument("--work", default=None, help="folder for the artifacts (default: a new temporary folder)")
    p.add_argument("--reuse", action="store_true", help="keep the variants an earlier run exported into --work")
    args = p.parse_args()

    test_dir = Path(args.data or "") / "test"
    if not args.data or not test_dir.is_dir():
        print(
            "bench/artifacts.py: skipped, it needs the real CIFAR-10 images: pass --data or set CIFARKIT_DATA to an "
            "extracted ImageFolder root holding train/ and test/ "
            f"({'not set' if not args.data else f'{test_dir} missing'})",
            file=sys.stderr,
        )
        return
    models = dict(m.split("=", 1) for m in args.model if "=" in m)
    missing = [f"{name}={path}" for name, path in models.items() if not Path(path).is_file()]
    if not models or missing:
        sys.exit(
            "bench/artifacts.py: give each model as --model NAME=CHECKPOINT (a checkpoint.pt of cifar-train)"
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    precisions = [x for x in args.precisions.split(",") if x]
    ttas = [x for x in args.tta.split(",") if x]
    work = Path(args.work or tempfile.mkdtemp(prefix="cifarkit-bench-artifacts-"))
    images = test_images(args.data)
    n_images = len(images)

    for name, checkpoint in models.items():
        rows = build_variants(name, checkpoint, precisions, ttas, work / name, args.data, args.reuse)
        measure(rows, images, test_dir, args.runs, args.repeats, work / name)
        print_table(name, rows, n_images)
    print(f"artifacts in {work}")


def build_variants(name: str, checkpoint: str, precisions, ttas, work: Path, data: str, reuse: bool) -> list[dict]:
    """Export each (precision, tta) once; a --tta that resolves to the recipe's own is not exported twice."""
    rows, seen = [], set()
    for tta in ttas:
        for precision in precisions:
            out = work / f"{precision}-tta-{tta}"
            if reuse and (out / "model.json").is_file():
                meta, wall = json.loads((out / "model.json").read_text()), float("nan")
            else:
                meta, wall = export_variant(checkpoint, out, precision, tta, data)
            key = (precision, meta["tta"])
            if key in seen:
                continue
            seen.add(key)
            ver = meta.get("variant", {}).get("verification", {})
            rows.append({
                "artifact": f"{precision}, tta {meta['tta']}" + (" (recipe)" if tta == "recipe" else ""),
                "reference": precision == "fp32" and tta == "recipe",
                "path": out / "model.onnx",
                "size": (out / "model.onnx").stat().st_size,
                "drop": ver.get("drop_points"),
                "same_class": ver.get("same_class"),
                "export_s": wall,
            })  # fmt: skip
            how = "reused (--reuse)" if math.isnan(wall) else f"exported in {wall:.1f} s"
            print(f"{name}: {rows[-1]['artifact']} {how}", file=sys.stderr)
    rows.sort(key=lambda r: not r["reference"])
    return rows


def measure(rows: list[dict], images, test_dir: Path, runs: int, repeats: int, work: Path) -> None:
    speeds = model_only_speeds({r["artifact"]: r["path"] for r in rows}, images, repeats)
    for row in rows:
        row["model_ips"] = speeds[row["artifact"]]
        row["walls"], row["rss"] = [], 0
    n = sum(1 for d in test_dir.iterdir() if d.is_dir() for _ in d.iterdir())
    for r in range(runs):
        for i, row in enumerate(rows):
            csv_path = work / f"pred-{i}.csv"
            cmd = [str(BIN / "cifar-infer"), str(test_dir), "--model", str(row["path"]), "--format", "csv"]
            cmd += ["--output", str(csv_path), "--progress", "none"]
            wall, code, rss, err = timed(cmd)
            if code != 0:
                sys.exit(f"cifar-infer failed (exit {code}): {' '.join(cmd)}\n{err}")
            row["walls"].append(wall)
            row["rss"] = max(row["rss"], rss)
            row["accuracy"], row["rows"] = infer_accuracy(str(csv_path))
            print(f"run {r + 1}/{runs} {row['artifact']:<28} {wall:6.2f} s {n / wall:8,.0f} images/s", file=sys.stderr)
    for row in rows:
        row["e2e_ips"] = n / statistics.median(row["walls"])


def print_table(name: str, rows: list[dict], n_images: int) -> None:
    ref = rows[0]
    print(f"\n{name}: reference {ref['artifact']}, {os.cpu_count()} CPU cores, accuracy on {ref['rows']:,} test images")
    head = f"{'artifact':<28}{'size':>10}{'vs':>7}{'accuracy':>10}{'drop':>7}{'same':>8}"
    print(head + f"{'model img/s':>12}{'vs':>7}{'e2e img/s':>11}{'vs':>7}{'peak RSS':>10}  gate 0.5")
    for row in rows:
        drop = 100 * (ref["accuracy"] - row["accuracy"])
        same = f"{100 * row['same_class']:.2f}%" if row["same_class"] is not None else "-"
        gate = "-" if row["reference"] else ("written" if (row["drop"] or 0) <= GATE else "refused")
        print(
            f"{row['artifact']:<28}{row['size'] / 1024:8,.0f}Ki{row['size'] / ref['size']:6.2f}x"
            f"{100 * row['accuracy']:9.2f}%{drop:+7.2f}{same:>8}"
            f"{row['model_ips']:12,.0f}{row['model_ips'] / ref['model_ips']:6.2f}x"
            f"{row['e2e_ips']:11,.0f}{row['e2e_ips'] / ref['e2e_ips']:6.2f}x{row['rss'] / 1024:7,.0f} MiB  {gate}"
        )
    print(
        "drop: accuracy points below the reference (cifar-infer on the JPEGs); same: the share of test images in "
        "the same class as the fp32 model with the recipe's TTA (cifar-export's verification, on the decoded test "
        "split); gate: what cifar-export's default --max-drop 0.5 would do"
    )


if __name__ == "__main__":
    main()
