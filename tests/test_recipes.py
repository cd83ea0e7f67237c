"""The strong recipe's parts: schedule, lookahead, augmentation, whitening, and a short run end to end."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.nets import AirbenchNet, BlogCNN, count_parameters, init_whitening
from cifarkit.spec import BLOG_MEAN, BLOG_STD, CIFAR10_MEAN, CIFAR10_STD
from cifarkit.train import Lookahead, TrainConfig, evaluate, make_optimization, train, triangle_schedule
from cifarkit.train.batches import DeviceBatches
from cifarkit.train.recipes import RECIPES, get_recipe
from conftest import export_checkpoint, synthetic_images

CPU = torch.device("cpu")


def test_triangle_schedule():
    f = triangle_schedule(100, 0.2, 0.23, 0.07)
    assert len(f) == 101
    assert f[0] == pytest.approx(0.2) and f[23] == pytest.approx(1.0) and f[100] == pytest.approx(0.07)
    assert max(f) == pytest.approx(1.0) and np.argmax(f) == 23
    assert all(a <= b for a, b in zip(f[:23], f[1:24], strict=True))  # rises, then falls
    assert all(a >= b for a, b in zip(f[23:-1], f[24:], strict=True))


def test_lookahead_moves_weights_towards_their_average():
    model = torch.nn.Linear(3, 2)
    look = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    look.update(model, decay=0.75)  # EMA = 0.75 * start + 0.25 * (start + 1)
    torch.testing.assert_close(model.weight.detach(), start + 0.25)
    torch.testing.assert_close(look.ema["weight"], start + 0.25)


def test_drop_last_keeps_full_batches_and_a_small_set_is_one_short_batch():
    x, y = synthetic_images(100, num_classes=10)
    full = DeviceBatches(x, y, batch_size=30, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, drop_last=True)
    assert len(full) == 3 and [len(yb) for _, yb in full.epoch(0)] == [30, 30, 30]
    kept = DeviceBatches(x, y, batch_size=30, device=CPU, mean=BLOG_MEAN, std=BLOG_STD)
    assert len(kept) == 4 and [len(yb) for _, yb in kept.epoch(0)] == [30, 30, 30, 10]
    # a data set smaller than one batch (sprint's 1,000 on a few hundred images): one batch of all, not none
    small = DeviceBatches(x, y, batch_size=1000, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, drop_last=True)
    assert len(small) == 1 and [len(yb) for _, yb in small.epoch(0)] == [100]


def test_translate_and_flip_augmentation():
    x, y = synthetic_images(64, seed=2)
    b = DeviceBatches(
        x, y, batch_size=64, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, translate=2, flip=True, shuffle=False
    )
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for epoch in (0, 1):
        out = b.images(epoch).numpy()
        for i in range(len(x)):
            views = [padded[i, 2 + sy : 34 + sy, 2 + sx : 34 + sx] for sy in range(-2, 3) for sx in range(-2, 3)]
            views += [v[:, ::-1] for v in views]
            assert any(np.array_equal(out[i], v) for v in views)
    # Flipping alternates: an image flipped in epoch 0 is not flipped in epoch 1, and vice versa.
    no_shift = DeviceBatches(x, y, batch_size=64, device=CPU, mean=BLOG_MEAN, std=BLOG_STD, flip=True, shuffle=False)
    e0, e1 = no_shift.images(0).numpy(), no_shift.images(1).numpy()
    flipped0 = [not np.array_equal(e0[i], x[i]) for i in range(len(x))]
    flipped1 = [not np.array_equal(e1[i], x[i]) for i in range(len(x))]
    assert 10 < sum(flipped0) < 54
    assert all(a != b for a, b in zip(flipped0, flipped1, strict=True))


def test_whitening_init_decorrelates_patches():
    torch.manual_seed(0)
    images = torch.randn(200, 3, 32, 32).cumsum(-1) / 10  # strongly correlated neighbouring pixels
    net = AirbenchNet()
    init_whitening(net.whiten, images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # the + half of the filters
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 0.05 * torch.diag(cov).max()
    assert count_parameters(net) == 1_972_792


def test_recipe_table():
    assert RECIPES["blog"].epochs == 4 and RECIPES["blog"].batch_size == 32 and RECIPES["blog"].lr == 1e-3
    assert RECIPES["blog"].mean == BLOG_MEAN == (0.5, 0.5, 0.5) and RECIPES["blog"].std == BLOG_STD
    assert RECIPES["airbench"].tta == "hflip_translate"
    assert RECIPES["airbench"].mean == CIFAR10_MEAN and RECIPES["airbench"].std == CIFAR10_STD
    with pytest.raises(CifarkitError, match="unknown recipe"):
        get_recipe("nope")


@pytest.mark.slow  # ~35 s; the CPU device check in the default suite also exports airbench and checks its parity
def test_short_airbench_run_exports_with_tta_inside(tmp_path, batches_py):
    result = train(
        TrainConfig(
            data=str(batches_py), recipe="airbench", epochs=1.5, batch_size=128, out=str(tmp_path / "run"), device="cpu"
        )
    )
    assert result.metrics.accuracy > 0.5  # chance is 0.1
    state = Checkpoint.load(result.checkpoint)
    artifact = state.artifact
    assert artifact.tta == "hflip_translate" and artifact.model_name == "airbench"
    assert artifact.mean == CIFAR10_MEAN and artifact.std == CIFAR10_STD
    assert [len(r["losses"]) for r in state.history] == [7, 4]  # ceil(7 steps an epoch * 1.5); last batch dropped

    # The public API, no normalization passed: the checkpoint's own gives the accuracy it recorded.
    x, y = synthetic_images(1200)
    deployed = state.deployed()
    metrics = evaluate(deployed, x[1000:], y[1000:], artifact.class_names, device=CPU)
    assert metrics.accuracy == state.metrics["accuracy"] == result.metrics.accuracy
    assert metrics.accuracy == pytest.approx(artifact.test_accuracy, abs=1e-6)

    exported = export_checkpoint(result.checkpoint, tmp_path / "art", format="onnx", verify_images=16)
    assert exported.meta.tta == "hflip_translate"
    session = ort.InferenceSession(str(exported.paths["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x[1000:]})[0]
    want, _ = deployed.run_numpy(x[1000:])
    assert np.abs(got - want).max() <= 1e-4
    assert float(np.mean(got.argmax(1) == y[1000:])) == pytest.approx(result.metrics.accuracy)


def test_models_own_their_parameter_groups():
    """The trainer matches no names: each net says which parameters train how."""
    recipe = RECIPES["airbench"]
    net = AirbenchNet()
    groups = {g.name: g for g in net.param_groups(recipe)}
    assert groups["norm_biases"].lr_scale == recipe.bias_lr_scale and len(groups["norm_biases"].params) == 6
    assert groups["whiten_bias"].params == [net.whiten.bias] and groups["whiten_bias"].train_epochs == 3
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    listed = [id(p) for g in groups.values() for p in g.params]
    assert sorted(listed) == sorted(trainable)  # every trainable parameter exactly once
    opt = make_optimization(net, recipe, lr=recipe.lr, batch_size=1024, device=CPU, total_steps=100, steps_per_epoch=10)
    opt.step = 29  # the last step of epoch 3 (0-based: 2)
    opt.set_lr()
    assert [g["lr"] > 0 for g in opt.optimizer.param_groups] == [True, True, True]
    opt.step = 30  # the whitening bias stops after 3 epochs
    opt.set_lr()
    assert [g["lr"] > 0 for g in opt.optimizer.param_groups] == [True, True, False]
    assert [g.name for g in BlogCNN().param_groups(RECIPES["blog"])] == ["all"]
