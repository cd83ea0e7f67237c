"""The prepared GPU check: cifarkit's accelerator path end to end, as one JSON of figures.

Trains the blog and airbench recipes on the device, exports both (ONNX and TorchScript, verified by export
on the CPU), compares the artifacts with the device-trained eager model on real test images, measures
TorchScript inference on the device at a large batch and, while the time budget lasts, torch.compile
against eager training. Writes device-check.json to --out (default $OUT, else runs/device-check) after every
phase, so a run stopped early still leaves what it measured. Run it through scripts/device-check.sh, whose
header says how to prepare the data and call it on the GPU machine.

    scripts/device-check.sh                               # CUDA, the real archives in .device-data/
    scripts/device-check.sh --device cpu --quick --out /tmp/dc   # the same phases, tiny synthetic data

The accuracy curves give three clocks for each evaluated epoch (CLOCKS below, also written into the JSON).
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the budget counts from here, before torch is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's cifarkit, installed or not

SCHEMA = "cifarkit.device-check/1"
RESULT_NAME = "device-check.json"
ARCHIVES = ("train.tar.gz", "test.tar.gz")
DEFAULT_DATA = ROOT / ".device-data"
RECIPES = ("blog", "airbench", "sprint")
THRESHOLDS = (0.90, 0.91)  # accuracies whose time-to is reported
PUBLISHED = "airbench94: 94 % in 3.29 s on one A100 (PNG CIFAR-10; Keller Jordan, arXiv 2404.00498)"
PARITY_TOLERANCE = 1e-3  # max |logit diff| across devices in strict fp32 (export's own, same-device check: 1e-4)
RESERVE_S = 15.0  # of the budget, kept for the last JSON write and cleaning up
EXIT_USAGE = 2
CLOCKS = {  # time.perf_counter seconds, at the end of each evaluated epoch
    "train_s": "training only: each epoch's clock stops after a device synchronize; loading data, building the "
    "model (whitening init included), evaluations and checkpoint writes are outside it (EpochRecord.seconds, "
    "summed). No warm-up run comes first: epoch 1 includes CUDA start-up and cuDNN's autotuning",
    "elapsed_s": "training plus the per-epoch evaluations and checkpoint writes since the first epoch began "
    "(EpochRecord.elapsed)",
    "wall_s": "since train() was called: elapsed_s plus loading the decoded data set and building the model",
}


@dataclass(frozen=True)
class Plan:
    """How big each phase is; --quick shrinks it so that the same phases run in seconds on a CPU."""

    quick: bool
    epochs: dict[str, float | None]  # per recipe; None: the recipe's own
    batch_size: dict[str, int | None]  # per recipe; None: the recipe's own
    per_class: tuple[int, int]  # synthetic images per class (train, test); --quick only
    verify_images: int  # real test images export verifies each artifact on
    parity_images: dict[str, int]  # per recipe: real test images compared across devices
    infer_batch: int  # images per call when measuring inference
    min_timed_s: float  # one timed repeat lasts at least this long
    compile_allowance_s: float  # a compiled run's budget beyond the eager run's duration
    variant_images: int  # labelled test images (and training images calibrating int8) of the compact variants


FULL = Plan(False, {"blog": None, "airbench": None, "sprint": None}, {"blog": None, "airbench": None, "sprint": None},
            (0, 0), 256, {"blog": 2000, "airbench": 1000, "sprint": 10000}, 4096, 0.3, 150.0, 2000)  # fmt: skip
QUICK = Plan(True, {"blog": 1, "airbench": 1, "sprint": 1}, {"blog": None, "airbench": 64, "sprint": 64}, (32, 10), 8,
             {"blog": 100, "airbench": 16, "sprint": 16}, 8, 0.02, 20.0, 32)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The report: one JSON, rewritten after every phase
# ---------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, path: Path, budget_s: float, facts: dict[str, Any]) -> None:
        self.path = path
        self.t0 = STARTED
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"schema": SCHEMA, "status": "running", **facts, "budget_s": budget_s}
        self.data.update(phases={}, skipped=[], failed=[])

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def phase(self, name: str, fn: Callable[[], Any], *, optional: bool = False, needs_s: float = 0.0) -> Any:
        """Run one phase, timed; a failure is recorded (and its traceback printed) and the run goes on. An
        optional phase is skipped when less than `needs_s` of the budget is left."""
        if optional and self.remaining() - RESERVE_S < needs_s:
            why = f"needs ~{needs_s:.0f} s, {max(self.remaining() - RESERVE_S, 0):.0f} s of the budget left"
            self.data["skipped"].append({"phase": name, "why": why})
            self.data["phases"][name] = {"status": "skipped", "why": why}
            self._say(f"{name}: skipped ({why})")
            return self.write() or None
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {_first_line(exc)}"}
            if not optional:
                self.data["failed"].append(name)
            value = None
        else:
            entry = {"status": "ok"}
        entry["seconds"] = round(time.perf_counter() - t, 3)
        self.data["phases"][name] = entry
        self._say(f"{name}: {entry['status']} in {entry['seconds']:.1f} s")
        self.write()
        return value

    def finish(self) -> bool:
        ok = not self.data["failed"]
        self.data["status"] = "ok" if ok else "failed"
        self.data["total_s"] = round(time.perf_counter() - self.t0, 3)
        self.write()
        return ok

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        self.data["headline"] = headline(self.data)  # kept current: a run cut short still has one
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def _say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------


def environment(device: Any) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from cifarkit.spec import versions
    from cifarkit.train.runtime import resolve_precision

    info: dict[str, Any] = {
        "versions": versions("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "python"),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnxruntime_providers": list(ort.get_available_providers()),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "auto_precision": resolve_precision("auto", device),
        "gpu": None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "count": torch.cuda.device_count(),
            "driver": _nvidia_driver(),
        }
    return info


def prepare_data(archives: Path, work: Path, plan: Plan) -> tuple[Path, Any, dict[str, Any]]:
    """Extract the two archives (synthetic ones under --quick) and decode them once into the cache that the
    training runs then read."""
    from cifarkit.data import load_data

    if plan.quick:
        archives = make_synthetic_archives(work / "synthetic", *plan.per_class)
    root = work / "data"
    t = time.perf_counter()
    for name in ARCHIVES:
        extract(archives / name, root)
    extract_s = time.perf_counter() - t
    data = load_data(str(root), str(work / "cache"))
    return (
        root,
        data,
        {
            "source": "synthetic JPEGs (--quick)" if plan.quick else "CIFAR-10 JPEG archives",
            "train_images": len(data.train_y),
            "test_images": len(data.test_y),
            "classes": len(data.classes),
            "extract_s": round(extract_s, 3),
            "decode_s": round(data.load_seconds, 3),
        },
    )


def train_recipe(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Train one recipe as `spec` says (TrainConfig fields); returns its figures and the checkpoint path."""
    import torch

    from cifarkit.stage import Silent
    from cifarkit.train import TrainConfig, train

    class Clock(Silent):
        """Wall time at the end of each epoch (its "Epoch [i/n] done" line)."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.wall: list[float] = []

        def note(self, text: str, kind: str = "info") -> None:
            if kind == "info" and text.startswith("Epoch ["):
                self.wall.append(time.perf_counter() - self.t0)

    cuda = str(spec["device"]).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    # No progress reads between epoch ends: each one would wait for the GPU.
    result = train(TrainConfig(**spec, progress_every=1 << 30, log_every=1 << 30), clock)
    s = result.summary
    secs = list(s["epoch_seconds"])
    curve = [
        {"epoch": i + 1, "accuracy": acc, "train_s": round(tr, 3), "elapsed_s": round(el, 3), "wall_s": round(w, 3)}
        for i, (acc, tr, el, w) in enumerate(
            zip(s["test_accuracy_per_epoch"], accumulate(secs), s["elapsed_seconds_per_epoch"], clock.wall, strict=True)
        )
        if acc is not None
    ]
    figures = {
        "epochs": s["epochs"],
        "batch_size": s["train_config"]["batch_size"],
        "precision": result.precision,
        "channels_last": result.channels_last,
        "compile": s["compile"],
        "s_per_epoch": [round(x, 4) for x in secs],
        "median_s_per_epoch": _median(secs),
        "median_s_per_epoch_after_first": _median(secs[1:]),
        "train_s": round(sum(secs), 3),
        "train_images_per_s": round(result.images_per_second, 1),
        "test_accuracy": result.metrics.accuracy,
        "tta": s["tta"],
        "accuracy_curve": curve,
        "time_to_accuracy": {f"{t:.2f}": next((c for c in curve if c["accuracy"] >= t), None) for t in THRESHOLDS},
        "data_load_s": round(s["data_load_seconds"], 3),
        "run_s": round(s["total_seconds"], 3),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }
    return figures, str(result.checkpoint)


def export_recipe(checkpoint: str, out: Path, test_x: Any, plan: Plan) -> tuple[dict[str, Any], dict[str, Path]]:
    """cifar-export's own path: both formats, each verified on the CPU against the eager model."""
    from cifarkit.export import ExportConfig, export

    cfg = ExportConfig(checkpoint=checkpoint, out=str(out), verify_images=plan.verify_images, speed=False)
    res = export(cfg, images=test_x[: plan.verify_images])
    checks = [
        {"format": c.fmt, "images": c.images, "max_abs_logit_diff": c.max_abs_diff, "same_classes": c.same_classes}
        for c in res.checks
    ]
    sizes = {fmt: p.stat().st_size for fmt, p in res.paths.items()}
    return {"verification": checks, "notes": res.notes, "bytes": sizes}, res.paths


def parity(checkpoint: str, paths: dict[str, Path], data: Any, device: Any, count: int) -> dict[str, Any]:
    """The artifacts against the eager model trained on `device`, on real test images: ONNX in onnxruntime
    (CPU providers on the device machine) and TorchScript on `device`; the eager reference in strict fp32
    (no TF32), and how far the device's default math (TF32 convolutions from Ampere on) moves it."""
    import numpy as np
    import torch

    from cifarkit.infer import Classifier
    from cifarkit.model.checkpoint import Checkpoint

    # Evenly spread over the test set: an ImageFolder's is sorted by class, so its first images are one class.
    pick = np.linspace(0, len(data.test_y) - 1, min(count, len(data.test_y))).astype(int)
    images, labels = data.test_x[pick], data.test_y[pick]
    count = len(pick)
    eager = Checkpoint.load(checkpoint).deployed().to(device)
    with strict_fp32():
        reference, _ = eager.run_numpy(images)
    default_math, _ = eager.run_numpy(images)
    clf = Classifier.from_file(paths["onnx"], intra_op_threads=os.cpu_count(), device="auto")
    onnx_logits, _ = clf.run(images, batch_size=500)
    module = _torchscript(paths["torchscript"], device)
    with strict_fp32(), torch.no_grad():
        ts_logits = np.concatenate(
            [module(torch.from_numpy(images[i : i + 500]).to(device))[0].cpu().numpy() for i in range(0, count, 500)]
        )
    onnx_vs, ts_vs = _compare(onnx_logits, reference), _compare(ts_logits, reference)
    return {
        "images": int(count),
        "onnxruntime_providers": list(clf.providers),
        "onnx_vs_eager_device": onnx_vs,
        "torchscript_device_vs_eager_device": ts_vs,
        "eager_default_math_vs_strict_fp32": _compare(default_math, reference),
        "accuracy": {
            "eager_device": _accuracy(reference, labels),
            "onnx": _accuracy(onnx_logits, labels),
            "torchscript_device": _accuracy(ts_logits, labels),
        },
        "criteria": f"max |logit diff| <= {PARITY_TOLERANCE:g} and the same class for every image",
        "ok": all(v["max_abs_logit_diff"] <= PARITY_TOLERANCE and v["same_class_fraction"] == 1.0
                  for v in (onnx_vs, ts_vs)),
    }  # fmt: skip


def inference(checkpoint: str, paths: dict[str, Path], data: Any, device: Any, plan: Plan) -> dict[str, Any]:
    """Images/s of the TorchScript artifact on `device` at plan.infer_batch: uint8 input already on the
    device, and copied from pinned host memory; on CUDA also bf16 (autocast) and the eager model in bf16 with
    channels_last, each checked against the fp32 artifact's logits."""
    import torch

    from cifarkit.model.checkpoint import Checkpoint

    n = plan.infer_batch
    batch = _test_batch(data, n)
    module = _torchscript(paths["torchscript"], device)
    x = torch.from_numpy(batch).to(device)
    out: dict[str, Any] = {"batch": n, "device": str(device)}
    with torch.inference_mode():
        fp32 = module(x)[0].float().cpu().numpy()
        out["torchscript_fp32_images_per_s"] = images_per_second(lambda: module(x), n, device, plan)
        host = torch.from_numpy(batch).pin_memory() if device.type == "cuda" else torch.from_numpy(batch)
        out["torchscript_fp32_from_host_images_per_s"] = images_per_second(
            lambda: module(host.to(device, non_blocking=True)), n, device, plan
        )
        if device.type != "cuda":
            return out
        out["fp32_math"] = "TF32 convolutions" if torch.backends.cudnn.allow_tf32 else "fp32"  # cuDNN's default
        eager = Checkpoint.load(checkpoint).deployed().to(device)
        eager.net.to(memory_format=torch.channels_last)
        variants = {"torchscript_bf16_autocast": lambda: module(x), "eager_bf16_channels_last": lambda: eager(x)}
        for name, fn in variants.items():
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = fn()[0].float().cpu().numpy()
                    rate = images_per_second(fn, n, device, plan)
            except Exception as exc:  # TorchScript's executor may refuse autocast; say so and carry on
                out[name] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
                continue
            out[name] = {"images_per_s": rate, "vs_fp32": _compare(logits, fp32)}
        rates = [out[k]["images_per_s"] for k in variants if "images_per_s" in out[k]]
        out["bf16_pays"] = bool(rates) and max(rates) > 1.05 * out["torchscript_fp32_images_per_s"]
    return out


def onnxruntime_speed(paths: dict[str, Path], data: Any, plan: Plan) -> dict[str, Any]:
    """The ONNX artifact in onnxruntime on this machine's providers, all cores, for scale."""

    from cifarkit.infer import Classifier

    clf = Classifier.from_file(paths["onnx"], intra_op_threads=os.cpu_count(), device="auto")
    n = min(plan.infer_batch, 1024)
    batch = _test_batch(data, n)
    rate = images_per_second(lambda: clf.run(batch, batch_size=n), n, None, plan)
    return {"providers": list(clf.providers), "batch": n, "threads": os.cpu_count(), "images_per_s": rate}


def compact_variants(checkpoint: str, root: Path, work: Path, plan: Plan) -> dict[str, Any]:
    """cifar-export's int8 and fp16 variants of the model, each measured against the fp32 model on labelled test
    images (the first plan.variant_images) and timed against it on this machine's CPU (--max-drop 100: the
    figures are the point here, not the gate)."""
    from cifarkit.export import ExportConfig, export

    out: dict[str, Any] = {}
    for name, how in (("int8", {"quantize": "int8"}), ("fp16", {"precision": "fp16"})):
        cfg = ExportConfig(
            checkpoint=checkpoint, format="onnx", out=str(work / name), data=str(root), data_dir=str(work / "cache"),
            verify_images=plan.variant_images, max_drop=100.0, calibration_images=plan.variant_images,
            speed=not plan.quick, **how,
        )  # fmt: skip
        res = export(cfg)
        out[name] = {
            "labelled_verification": res.accuracy.to_dict() if res.accuracy else None,
            "table": [
                {
                    "artifact": r.artifact,
                    "bytes": r.size,
                    "accuracy": r.accuracy,
                    "images_per_s": r.images_per_s,
                    "ratio": r.ratio,
                }
                for r in res.table
            ],  # fmt: skip
        }
    return out


def compiled_run(spec: dict[str, Any], eager: dict[str, Any], work: Path, plan: Plan, timeout_s: float) -> dict:
    """The same recipe with torch.compile, in a child process with a hard timeout (a compile that runs long
    must not eat the rest of the budget); compared with the eager run epoch by epoch. Under --quick the
    compiler is switched off (TORCH_COMPILE_DISABLE=1): the plumbing runs, nothing is compiled."""
    spec_path, result_path = work / f"{spec['recipe']}-compile.json", work / f"{spec['recipe']}-compile-result.json"
    spec_path.write_text(json.dumps({**spec, "compile": True, "out": str(work / f"{spec['recipe']}-compiled")}))
    env = {**os.environ, **({"TORCH_COMPILE_DISABLE": "1"} if plan.quick else {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(spec_path), str(result_path)]
    proc = subprocess.run(cmd, env=env, timeout=timeout_s, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiled run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    compiled = json.loads(result_path.read_text())
    first = eager["median_s_per_epoch_after_first"] or eager["median_s_per_epoch"]
    then = compiled["median_s_per_epoch_after_first"] or compiled["median_s_per_epoch"]
    return {
        "compiler": "disabled (--quick: TORCH_COMPILE_DISABLE=1)" if plan.quick else "torch.compile (inductor)",
        "compiled": compiled,
        "eager_median_s_per_epoch_after_first": first,
        "compiled_median_s_per_epoch_after_first": then,
        "per_epoch_speedup": round(first / then, 3) if then else None,
        "first_epoch_extra_s": round(compiled["s_per_epoch"][0] - eager["s_per_epoch"][0], 3),
        "pays_per_epoch": bool(then and then < 0.95 * first),
        "pays_for_this_run": compiled["train_s"] < eager["train_s"],
    }


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def run(device: Any, archives: Path, report: Report, work: Path, plan: Plan) -> None:
    report.data["environment"] = report.phase("environment", lambda: environment(device))
    prepared = report.phase("data", lambda: prepare_data(archives, work, plan))
    if prepared is None:
        return
    root, data, report.data["data"] = prepared
    base = {"data": str(root), "data_dir": str(work / "cache"), "device": str(device), "eval_every": 1}
    specs = {
        r: {**base, "recipe": r, "epochs": plan.epochs[r], "batch_size": plan.batch_size[r], "out": str(work / r)}
        for r in RECIPES
    }
    trained: dict[str, tuple[dict[str, Any], str]] = {}
    report.data["recipes"] = {}
    for r in RECIPES:
        got = report.phase(f"train_{r}", lambda r=r: train_recipe(specs[r]))
        if got is not None:
            trained[r] = got
            report.data["recipes"][r] = got[0]
    artifacts: dict[str, dict[str, Path]] = {}
    report.data.update(export={}, parity={}, inference={})
    for r, (_, ckpt) in trained.items():
        got = report.phase(
            f"export_{r}", lambda r=r, c=ckpt: export_recipe(c, work / f"{r}-artifacts", data.test_x, plan)
        )
        if got is not None:
            report.data["export"][r], artifacts[r] = got
    for r, paths in artifacts.items():
        ckpt, count = trained[r][1], plan.parity_images[r]
        report.data["parity"][r] = report.phase(
            f"parity_{r}", lambda c=ckpt, p=paths, n=count: parity(c, p, data, device, n)
        )
    for r, paths in artifacts.items():
        ckpt = trained[r][1]
        report.data["inference"][r] = report.phase(
            f"inference_{r}", lambda c=ckpt, p=paths: inference(c, p, data, device, plan)
        )

    # ---- optional, while the budget lasts: torch.compile measured, onnxruntime for scale ----------------
    report.data["compile"] = {}
    for r in ("airbench",) if plan.quick else ("airbench", "blog"):  # --quick: the plumbing once is enough
        if r not in trained:
            continue
        eager = trained[r][0]
        needs = eager["run_s"] + plan.compile_allowance_s
        report.data["compile"][r] = report.phase(
            f"compile_{r}",
            lambda r=r, e=eager: compiled_run(specs[r], e, work, plan, max(report.remaining() - RESERVE_S, 1.0)),
            optional=True,
            needs_s=needs,
        )
    report.data["onnxruntime"] = {}
    for r, paths in artifacts.items():
        report.data["onnxruntime"][r] = report.phase(
            f"onnxruntime_{r}", lambda p=paths: onnxruntime_speed(p, data, plan), optional=True, needs_s=10.0
        )
    report.data["variants"] = {}
    for r in ("blog",) if plan.quick else artifacts:  # --quick: the plumbing once is enough
        ckpt = trained[r][1]
        report.data["variants"][r] = report.phase(
            f"variants_{r}", lambda c=ckpt, r=r: compact_variants(c, root, work / f"{r}-variants", plan),
            optional=True, needs_s=30.0,
        )  # fmt: skip


def headline(d: dict[str, Any]) -> dict[str, Any]:
    """The figures a note quotes, gathered from the sections above (None where a phase did not run)."""
    rec, inf = d.get("recipes") or {}, d.get("inference") or {}
    air = rec.get("airbench", {})
    at91 = (air.get("time_to_accuracy") or {}).get("0.91")
    return {
        "gpu": ((d.get("environment") or {}).get("gpu") or {}).get("name"),
        "airbench_test_accuracy": air.get("test_accuracy"),
        "airbench_time_to_91": at91,
        "airbench_train_s": air.get("train_s"),
        "blog_median_s_per_epoch": rec.get("blog", {}).get("median_s_per_epoch"),
        "blog_test_accuracy": rec.get("blog", {}).get("test_accuracy"),
        "sprint_test_accuracy": rec.get("sprint", {}).get("test_accuracy"),
        "sprint_train_s": rec.get("sprint", {}).get("train_s"),
        "sprint_parity_ok": ((d.get("parity") or {}).get("sprint") or {}).get("ok"),
        "torchscript_images_per_s": {r: (v or {}).get("torchscript_fp32_images_per_s") for r, v in inf.items()},
        "int8_speed_vs_fp32_cpu": {
            r: (v or {}).get("int8", {}).get("table", [{}, {}])[-1].get("ratio")
            for r, v in (d.get("variants") or {}).items()
        },
        "published_reference": PUBLISHED,
    }


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def check_archives(folder: Path) -> Path:
    from cifarkit.errors import CifarkitError

    missing = [name for name in ARCHIVES if not (folder / name).is_file()]
    if missing:
        raise CifarkitError(
            f"device check: {folder} lacks {' and '.join(missing)}; fill it first, in the checkout's root: "
            "mkdir -p .device-data && cp ../shared/data/cifar10-jpeg/*.tar.gz .device-data/ "
            "(or pass --data FOLDER; --quick makes synthetic data instead)"
        )
    return folder


def extract(archive: Path, dest: Path) -> None:
    """GNU or BSD tar where there is one: 60,000 small files in ~1 s on a tmpfs, against ~18 s for Python's
    tarfile (measured). Both refuse members that climb out of `dest` ('..' or an absolute path)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest), "--no-same-owner"], check=True)
        return
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 backports
            tar.extractall(dest, filter="data")
        else:
            bad = [m.name for m in tar.getmembers() if m.name.startswith("/") or ".." in Path(m.name).parts]
            if bad or any(not (m.isfile() or m.isdir()) for m in tar.getmembers()):
                raise ValueError(f"{archive}: unsafe member {bad[:1] or 'link or device'}; refusing to extract")
            tar.extractall(dest)


def make_synthetic_archives(folder: Path, per_class_train: int, per_class_test: int) -> Path:
    """train.tar.gz and test.tar.gz laid out like the real ones (<split>/<class>/NNNN.jpg, JPEG quality 75):
    each class a hue and a stripe direction under noise, learnable in one short epoch."""
    import numpy as np
    from PIL import Image

    from cifarkit.spec import CIFAR10_CLASSES

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        for c, name in enumerate(CIFAR10_CLASSES):
            d = folder / split / name
            d.mkdir(parents=True)
            colour = np.array(colorsys.hsv_to_rgb(c / len(CIFAR10_CLASSES), 0.8, 0.9)) * 255
            stripes = (((xx if c % 2 else yy) // 4) % 2)[..., None]
            for i in range(per):
                img = colour * (0.6 + 0.4 * stripes) + rng.normal(0, 40, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=75)
        with tarfile.open(folder / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(folder / split, arcname=split)
    return folder


def images_per_second(fn: Callable[[], Any], n: int, device: Any, plan: Plan) -> float:
    """Median images/s of `fn` (n images a call) over 3 timed repeats, each long enough to time (at least
    plan.min_timed_s), after warm-up calls (TorchScript specializes its graph on the first runs)."""
    from cifarkit.train.runtime import synchronize

    def sync() -> None:
        if device is not None:
            synchronize(device)

    for _ in range(1 if plan.quick else 3):
        fn()
    sync()
    calls, rates = 1, []
    while len(rates) < 3:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        dt = time.perf_counter() - t
        if dt < plan.min_timed_s and calls < 4096:
            calls *= 2
            continue
        rates.append(calls * n / dt)
    return round(statistics.median(rates), 1)


@contextlib.contextmanager
def strict_fp32():
    """Plain fp32 on CUDA (no TF32 in convolutions or matmuls), restored afterwards; a no-op elsewhere."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch suggests its fp32_precision API; these flags still work
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _test_batch(data: Any, n: int) -> Any:
    """n test images in a fixed shuffled order (every class; the set repeats if n is larger), uint8."""
    import numpy as np

    order = np.random.default_rng(0).permutation(len(data.test_x))
    return np.ascontiguousarray(np.resize(data.test_x[order], (n, *data.test_x.shape[1:])))


def _torchscript(path: Path, device: Any) -> Any:
    """model.pt loaded as cifarkit's own loader does (its deprecation warnings kept quiet), on `device`."""
    from cifarkit.export import load_torchscript

    module, _ = load_torchscript(path)
    return module.to(device)


def _scratch_parent() -> str | None:
    """/dev/shm where it is a writable tmpfs with room: 60,000 small files extract there in ~1 s, against
    ~20-45 s on the development machine's disk (measured; file creation is the cost). Else the temp folder."""
    shm = Path("/dev/shm")
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return str(shm) if free > 2 << 30 and os.access(shm, os.W_OK) else None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def _compare(got: Any, want: Any) -> dict[str, float]:
    import numpy as np

    return {
        "max_abs_logit_diff": float(np.max(np.abs(got - want))) if got.size else 0.0,
        "same_class_fraction": float(np.mean(got.argmax(1) == want.argmax(1))) if len(got) else 1.0,
    }


def _accuracy(logits: Any, labels: Any) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def child_train(spec_path: str, result_path: str) -> int:
    """--child-train: one training run for compiled_run, its figures written to `result_path`."""
    figures, _ = train_recipe(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(figures))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="device-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto.")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Folder holding train.tar.gz and test.tar.gz.")
    p.add_argument("--out", default=None, help="Where device-check.json goes (default: $OUT, else runs/device-check).")
    p.add_argument("--budget", type=float, default=None, help="Seconds; optional phases stop fitting after it "
                   "(default 330, 120 with --quick).")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="Tiny synthetic data and short runs: the same phases fast.")
    p.add_argument("--work", default=None, help="Scratch folder's parent (default: /dev/shm, else the temp folder).")
    p.add_argument("--child-train", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_train:
        return child_train(*args.child_train)
    from cifarkit.errors import CifarkitError
    from cifarkit.train.runtime import select_device

    plan = QUICK if args.quick else FULL
    try:
        device = select_device(args.device)
        archives = Path(args.data) if plan.quick else check_archives(Path(args.data))
    except CifarkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "device-check")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (120.0 if plan.quick else 330.0)
    facts = {"mode": "quick" if plan.quick else "full", "device": str(device), "plan": asdict(plan), "clocks": CLOCKS}
    report = Report(out / RESULT_NAME, budget, facts)
    work = Path(tempfile.mkdtemp(prefix="cifarkit-device-check-", dir=args.work or _scratch_parent()))
    try:
        run(device, archives, report, work, plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = report.finish()
    print(f"{'ok' if ok else 'FAILED: ' + ', '.join(report.data['failed'])}: {report.path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
