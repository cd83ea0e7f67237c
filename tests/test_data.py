"""Data sources, the decoded-image cache and batching from memory."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cifarkit.data import load_data
from cifarkit.errors import CifarkitError
from cifarkit.preprocess import load_image
from cifarkit.spec import BLOG_MEAN, BLOG_STD, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from cifarkit.train.batches import DeviceBatches
from conftest import needs_real_data, synthetic_images, write_batches_py, write_imagefolder

CPU = torch.device("cpu")


def test_batches_py_folder_and_its_parent(tmp_path):
    folder = write_batches_py(tmp_path / "cifar-10-batches-py", n_train=100, n_test=20, seed=3)
    x, y = synthetic_images(120, seed=3)
    for source in (folder, tmp_path):
        data = load_data(str(source), tmp_path / "cache")
        assert data.kind == "batches-py"
        assert data.classes == CIFAR10_CLASSES
        assert data.train_x.shape == (100, 32, 32, 3) and data.train_x.dtype == np.uint8
        assert data.test_x.shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(data.train_x, x[:100])  # CIFAR's planar rows come back as HWC pixels
        np.testing.assert_array_equal(data.test_y, y[100:])


def test_batches_py_missing_file_is_named(tmp_path):
    folder = write_batches_py(tmp_path / "b", n_train=50, n_test=10)
    (folder / "test_batch").unlink()
    with pytest.raises(CifarkitError, match="test_batch is missing"):
        load_data(str(folder), tmp_path / "cache")


def test_imagefolder_pixels_labels_and_cache(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", per_class_train=4, per_class_test=2, num_classes=3)
    cache = tmp_path / "cache"
    first = load_data(str(root), cache)
    assert first.kind == "imagefolder" and not first.from_cache
    assert first.classes == ("class0", "class1", "class2")
    assert len(first.train_y) == 12 and len(first.test_y) == 6
    # Sorted order: class0/*, class1/*, ...; pixels are exactly the PNG's.
    path0 = sorted((root / "train" / "class0").iterdir())[0]
    np.testing.assert_array_equal(first.train_x[0], np.asarray(Image.open(path0).convert("RGB")))
    assert first.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    second = load_data(str(root), cache)
    assert second.from_cache
    np.testing.assert_array_equal(second.train_x, first.train_x)

    # A changed source is noticed: a new image invalidates the cache.
    Image.fromarray(first.train_x[0]).save(root / "train" / "class1" / "zzz.png")
    third = load_data(str(root), cache)
    assert not third.from_cache and len(third.train_y) == 13

    # So is an edited file (same name, new content and mtime).
    target = root / "train" / "class2" / sorted(os.listdir(root / "train" / "class2"))[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    fourth = load_data(str(root), cache)
    assert not fourth.from_cache
    assert (fourth.train_x == np.array([1, 2, 3], np.uint8)).all(axis=-1).all(axis=(1, 2)).any()


def test_imagefolder_other_sizes_use_the_inference_rule(tmp_path):
    root = write_imagefolder(tmp_path / "big", per_class_train=2, per_class_test=1, num_classes=2, size=48)
    big = root / "train" / "class0" / sorted(os.listdir(root / "train" / "class0"))[0]
    Image.open(big).resize((60, 48)).save(big)  # non-square too
    data = load_data(str(root), tmp_path / "cache")
    assert data.train_x.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(data.train_x[0], load_image(big))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("no_splits", "has no train/ and test/"),
        ("empty_class", "has no images"),
        ("one_class", "at least 2 class folders"),
        ("class_mismatch", "differ"),
        ("unreadable", "unreadable image .*broken.jpg"),
    ],
)
def test_imagefolder_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "root"
    if layout != "missing":
        root.mkdir()
    if layout == "no_splits":
        (root / "something").mkdir()
    if layout in ("empty_class", "class_mismatch", "unreadable", "one_class"):
        write_imagefolder(root, per_class_train=2, per_class_test=1, num_classes=2 if layout != "one_class" else 1)
    if layout == "empty_class":
        (root / "train" / "class2").mkdir()
        (root / "test" / "class2").mkdir()
    if layout == "class_mismatch":
        shutil.rmtree(root / "test" / "class1")
        write_imagefolder(tmp_path / "other", per_class_train=1, per_class_test=1, num_classes=3)
        shutil.copytree(tmp_path / "other" / "test" / "class2", root / "test" / "class2")
    if layout == "unreadable":
        (root / "train" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(CifarkitError, match=message):
        load_data(str(root), tmp_path / "cache")


def test_torchvision_offline_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(CifarkitError, match="could not download CIFAR-10.*--data PATH"):
        load_data("torchvision", tmp_path / "cache")


def test_torchvision_source_uses_an_existing_download(tmp_path):
    write_batches_py(tmp_path / "cache" / "torchvision" / "cifar-10-batches-py", n_train=50, n_test=10)
    data = load_data("torchvision", tmp_path / "cache")
    assert data.kind == "torchvision" and len(data.train_y) == 50


def test_device_batches_cover_every_image_once_per_epoch():
    x, y = synthetic_images(100)
    batches = DeviceBatches(x, y, batch_size=32, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, seed=5)
    assert len(batches) == 4
    seen = torch.cat([yb for _, yb in batches.epoch(0)])
    assert sorted(seen.tolist()) == sorted(y.tolist())
    assert not torch.equal(batches.order(0), batches.order(1))  # reshuffled every epoch
    again = DeviceBatches(x, y, batch_size=32, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, seed=5)
    assert torch.equal(batches.order(1), again.order(1))


@pytest.mark.parametrize(("mean", "std"), [(BLOG_MEAN, BLOG_STD), (CIFAR10_MEAN, CIFAR10_STD)])
def test_device_batches_normalize_like_totensor_and_normalize(mean, std):
    import torchvision.transforms as T

    x, y = synthetic_images(8)
    batches = DeviceBatches(x, y, batch_size=8, device=CPU, mean=mean, std=std, shuffle=False)
    xb, _ = next(batches.epoch(0))
    reference = torch.stack([T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(img))) for img in x])
    assert xb.shape == (8, 3, 32, 32)
    torch.testing.assert_close(xb, reference, rtol=0, atol=1e-6)


def test_device_batches_shard_disjointly_across_ranks():
    x, y = synthetic_images(50)
    orders = [
        DeviceBatches(x, y, batch_size=8, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, rank=r, world_size=2).order(3)
        for r in (0, 1)
    ]
    assert len(orders[0]) == len(orders[1]) == 25
    assert set(orders[0].tolist()).isdisjoint(orders[1].tolist())
    assert set(orders[0].tolist()) | set(orders[1].tolist()) == set(range(50))


@needs_real_data
def test_real_imagefolder_loads_cifar10():
    data = load_data(os.environ["CIFARKIT_DATA"])
    assert data.classes == CIFAR10_CLASSES
    assert data.train_x.shape == (50000, 32, 32, 3) and data.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(data.test_y).tolist() == [1000] * 10
