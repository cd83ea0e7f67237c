"""Shared fixtures: small synthetic data sets in each source format, a briefly trained checkpoint and its
exported artifacts. Everything is CPU-only and takes seconds; real-data tests opt in via CIFARKIT_DATA."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REAL_DATA = os.environ.get("CIFARKIT_DATA")
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA and (Path(REAL_DATA) / "train").is_dir() and (Path(REAL_DATA) / "test").is_dir()),
    reason="set CIFARKIT_DATA to an extracted CIFAR-10 ImageFolder root (train/ and test/)",
)

# Each synthetic class is a colour plus a stripe orientation: learnable in one short epoch.
_COLOURS = np.array(
    [
        [220, 40, 40],
        [40, 200, 40],
        [40, 40, 220],
        [220, 220, 40],
        [220, 40, 220],
        [40, 220, 220],
        [240, 140, 20],
        [130, 60, 200],
        [120, 120, 120],
        [20, 20, 20],
    ],
    dtype=np.float32,
)


def synthetic_images(n: int, num_classes: int = 10, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, 3] images and int64 [n] labels, balanced over `num_classes`."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(y)
    yy, xx = np.mgrid[0:size, 0:size]
    x = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        stripes = ((xx if label % 2 else yy) // 4) % 2  # vertical or horizontal stripes
        base = _COLOURS[label % len(_COLOURS)] * (0.6 + 0.4 * stripes[..., None])
        noise = rng.normal(0, 70, size=(size, size, 3))
        x[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return x, y


def write_batches_py(folder: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder (the pickles torchvision downloads) with synthetic images."""
    from cifarkit.spec import CIFAR10_CLASSES

    folder.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images(n_train + n_test, seed=seed)
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR's row layout: R plane, G plane, B plane
    per = n_train // 5
    for i in range(5):
        sl = slice(i * per, (i + 1) * per if i < 4 else n_train)
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": flat[sl], b"labels": y[sl].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": flat[n_train:], b"labels": y[n_train:].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)
    return folder


def write_imagefolder(
    root: Path,
    per_class_train: int = 8,
    per_class_test: int = 3,
    num_classes: int = 3,
    size: int = 32,
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """An ImageFolder root with train/ and test/ of synthetic images named class0, class1, ..."""
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        x, y = synthetic_images(per * num_classes, num_classes=num_classes, seed=seed + len(split), size=size)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{fmt}")
    return root


def run_cli(main, *args) -> tuple[int, str, str]:
    """Run a console script's main in-process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def export_checkpoint(checkpoint, out, *, images=None, **settings):
    """cifarkit.export.export for a checkpoint and an output folder (ExportConfig's other fields as keywords)."""
    from cifarkit.export import ExportConfig, export

    return export(ExportConfig(checkpoint=str(checkpoint), out=str(out), **settings), images=images)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-image caches and downloads out of the user's ~/.cache."""
    monkeypatch.setenv("CIFARKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def batches_py(tmp_path_factory) -> Path:
    return write_batches_py(tmp_path_factory.mktemp("batches") / "cifar-10-batches-py")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, batches_py):
    """A blog CNN trained for 2 epochs on 1,000 synthetic images (a few seconds on a CPU)."""
    from cifarkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        data=str(batches_py), data_dir=str(tmp_path_factory.mktemp("cache")), epochs=2, out=str(out), device="cpu"
    )
    return train(cfg)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_run):
    """model.onnx, model.pt and model.json exported from `trained_run`."""
    from cifarkit.export import ExportConfig, export

    return export(ExportConfig(checkpoint=str(trained_run.checkpoint), out=str(tmp_path_factory.mktemp("artifacts"))))


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """One epoch of the blog recipe on the real data set (CIFARKIT_DATA); about 15-30 s on 2 cores."""
    if not REAL_DATA:
        pytest.skip("set CIFARKIT_DATA to an extracted CIFAR-10 ImageFolder root (train/ and test/)")
    from cifarkit.train import TrainConfig, train

    cfg = TrainConfig(
        data=REAL_DATA,
        data_dir=str(tmp_path_factory.getbasetemp() / "cache"),
        epochs=1,
        out=str(tmp_path_factory.mktemp("real-run")),
        device="cpu",
    )
    return train(cfg)


@pytest.fixture(scope="session")
def variants(tmp_path_factory, trained_run, batches_py) -> dict[str, Any]:
    """The fp32 export of `trained_run` and its int8, fp16 and hflip-TTA variants, each verified on the synthetic
    data set (cifar-export's own path: calibration, labelled verification, metadata)."""
    out = {}
    for name, settings in (
        ("fp32", {}),
        ("int8", {"quantize": "int8"}),
        ("fp16", {"precision": "fp16"}),
        ("tta-hflip", {"tta": "hflip"}),
    ):
        folder = tmp_path_factory.mktemp(name)
        out[name] = export_checkpoint(trained_run.checkpoint, folder, format="onnx", data=str(batches_py), **settings)
    return out
