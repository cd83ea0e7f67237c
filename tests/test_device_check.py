"""The GPU path without a GPU: the prepared device check runs all its phases on the CPU (--quick), and the CUDA
pieces of cifarkit.train.runtime and train_one_epoch (precision choice, fp16 gradient scaling, cuDNN autotuning, the
missing-CUDA message) are checked with the device's answers patched in."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.model.nets import build_model
from cifarkit.train import runtime
from cifarkit.train.recipes import get_recipe
from cifarkit.train.runtime import check_options, cudnn_autotune, grad_scaler, resolve_precision, select_device
from conftest import synthetic_images

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device-check.sh"
CUDA = torch.device("cuda")


def device_check(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------------------------
# The device check, --device cpu --quick: the same phases as on the GPU, on tiny synthetic data
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("device-check")
    proc = device_check("--device", "cpu", "--quick", "--out", out, "--budget", 600)
    path = out / "device-check.json"
    return proc, (json.loads(path.read_text()) if path.exists() else {})


def test_quick_check_passes_every_phase(quick):
    proc, report = quick
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert report["status"] == "ok" and report["mode"] == "quick" and report["device"] == "cpu"
    expected = {"environment", "data"} | {
        f"{phase}_{recipe}" for phase in ("train", "export", "parity", "inference", "onnxruntime")
        for recipe in ("blog", "airbench", "sprint")
    } | {"compile_airbench", "variants_blog"}  # fmt: skip
    assert set(report["phases"]) == expected
    assert all(p["status"] == "ok" for p in report["phases"].values()), report["phases"]
    assert report["failed"] == [] and report["skipped"] == []
    for name in expected:  # one progress line per phase
        assert f"] {name}: ok in " in proc.stdout


def test_quick_check_figures(quick):
    _, report = quick
    assert report["data"]["train_images"] == 320 and report["data"]["test_images"] == 100
    for recipe in ("blog", "airbench", "sprint"):
        r = report["recipes"][recipe]
        assert len(r["s_per_epoch"]) == 1 and r["s_per_epoch"][0] > 0 and r["train_images_per_s"] > 0
        assert 0 <= r["test_accuracy"] <= 1 and r["peak_gpu_memory_mib"] is None
        [point] = r["accuracy_curve"]
        assert point["accuracy"] == r["test_accuracy"]
        assert 0 < point["train_s"] <= point["elapsed_s"] <= point["wall_s"]  # the three clocks nest
        assert set(r["time_to_accuracy"]) == {"0.90", "0.91"}
        assert all(c["same_classes"] for c in report["export"][recipe]["verification"])
        parity = report["parity"][recipe]
        assert parity["ok"] and parity["onnxruntime_providers"] == ["CPUExecutionProvider"]
        assert parity["onnx_vs_eager_device"]["max_abs_logit_diff"] < 1e-4
        assert report["inference"][recipe]["torchscript_fp32_images_per_s"] > 0
        assert report["onnxruntime"][recipe]["images_per_s"] > 0
    for variant in ("int8", "fp16"):  # cifar-export's variants, verified on labelled test images
        checked = report["variants"]["blog"][variant]["labelled_verification"]
        assert checked["images"] == 32 and 0 <= checked["accuracy"] <= 1
    compiled = report["compile"]["airbench"]
    assert compiled["compiler"].startswith("disabled") and compiled["compiled"]["compile"] is True
    assert set(report["clocks"]) == {"train_s", "elapsed_s", "wall_s"}
    assert report["headline"]["airbench_test_accuracy"] == report["recipes"]["airbench"]["test_accuracy"]
    assert report["environment"]["gpu"] is None and report["environment"]["versions"]["torch"] == torch.__version__


def test_missing_archives_are_refused_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    proc = device_check("--device", "cpu", "--data", tmp_path / "data", "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: device check: {tmp_path / 'data'} lacks train.tar.gz and test.tar.gz")
    assert "cp ../shared/data/cifar10-jpeg/*.tar.gz .device-data/" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_check_on_cuda_without_cuda_is_refused(tmp_path):
    proc = device_check("--device", "cuda", "--quick", "--out", tmp_path, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: --device cuda: CUDA is not available: ") and "install" in line


# ---------------------------------------------------------------------------------------------------------
# cifarkit.train.runtime's CUDA choices, with the GPU's answers patched in
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")],
)
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(runtime, "cuda_capability", lambda device: capability)
    assert resolve_precision("auto", CUDA) == expected


def test_fp16_is_for_cuda_only():
    check_options("fp16", "auto", None)
    assert resolve_precision("fp16", CUDA) == "fp16"
    with pytest.raises(CifarkitError, match="--precision fp16: needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(CifarkitError, match="--precision must be auto, fp32, bf16 or fp16, got 'fp8'"):
        check_options("fp8", "auto", None)


def test_a_gradient_scaler_only_for_fp16():
    assert grad_scaler(CUDA, "bf16") is None and grad_scaler(torch.device("cpu"), "fp32") is None
    # Without CUDA, torch makes the scaler and warns that it is disabled.
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        assert isinstance(grad_scaler(CUDA, "fp16"), torch.amp.GradScaler)


def test_cudnn_autotuning_on_cuda_only_and_restored():
    before = torch.backends.cudnn.benchmark
    with cudnn_autotune(CUDA):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with cudnn_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("cuda_build", "needle"),
    [(None, "is a CPU-only build; install a CUDA build of torch"), ("13.0", "built for CUDA 13.0) finds no GPU")],
)
def test_missing_cuda_names_what_to_install(monkeypatch, cuda_build, needle):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(CifarkitError) as info:
        select_device("cuda")
    assert str(info.value).startswith("--device cuda: CUDA is not available: ") and needle in str(info.value)


def test_a_scaled_epoch_trains_like_an_unscaled_one():
    """The GradScaler branch of train_one_epoch, on the CPU: a power-of-two loss scale and its exact undoing
    leave the fp32 trajectory unchanged."""
    from cifarkit.train import make_optimization, train_one_epoch
    from cifarkit.train.batches import DeviceBatches

    recipe = get_recipe("blog")
    x, y = synthetic_images(96, seed=5)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = build_model("blog_cnn", num_classes=10)
        batches = DeviceBatches(x, y, batch_size=32, device=torch.device("cpu"), mean=recipe.mean, std=recipe.std)
        opt = make_optimization(
            model, recipe, lr=1e-3, batch_size=32, device=torch.device("cpu"), total_steps=3, steps_per_epoch=3
        )
        losses = train_one_epoch(model, batches, opt, 0, scaler=scaler)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert len(loss_a) == 3 and torch.equal(loss_a, loss_b)
    assert all(np.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(params_a, params_b, strict=True))
