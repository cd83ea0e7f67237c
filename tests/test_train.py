"""The model, the training loop, checkpoints and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.deployed import DeployedModel
from cifarkit.model.nets import BlogCNN, build_model, count_parameters
from cifarkit.spec import BLOG_MEAN, BLOG_STD
from cifarkit.stage import Silent
from cifarkit.train import TrainConfig, evaluate, make_optimization, train, train_one_epoch
from cifarkit.train.batches import DeviceBatches
from cifarkit.train.recipes import RECIPES
from cifarkit.train.runtime import select_device
from conftest import synthetic_images

CPU = torch.device("cpu")


def test_blog_cnn_shape_and_parameter_count():
    model = BlogCNN(num_classes=10)
    assert count_parameters(model) == 89_834  # the blog's figure
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    assert build_model("blog_cnn", num_classes=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(CifarkitError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", num_classes=10)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    x, y = synthetic_images(256)
    model = BlogCNN()
    deployed = DeployedModel(model, BLOG_MEAN, BLOG_STD)
    batches = DeviceBatches(x, y, batch_size=32, device=CPU, mean=BLOG_MEAN, std=BLOG_STD)
    before = evaluate(deployed, x, y, tuple(map(str, range(10))), device=CPU)
    opt = make_optimization(
        model, RECIPES["blog"], lr=1e-3, batch_size=32, device=CPU, total_steps=24, steps_per_epoch=8
    )
    for epoch in range(3):
        losses = train_one_epoch(model, batches, opt, epoch)
    after = evaluate(deployed, x, y, tuple(map(str, range(10))), device=CPU)
    assert after.loss < 0.7 * before.loss
    assert losses.shape == (8,) and torch.isfinite(losses).all()


def test_run_folder_contents(trained_run):
    out = trained_run.out_dir
    assert {"checkpoint.pt", "metrics.json", "loss.png"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(trained_run.metrics.accuracy)
    assert set(metrics["test"]["per_class"]) == set(metrics["classes"])
    assert len(metrics["loss_per_batch"]) == 2 * 32  # 1,000 images / batch 32 = 32 batches, 2 epochs
    assert len(metrics["epoch_seconds"]) == 2 and all(s > 0 for s in metrics["epoch_seconds"])
    for key in ("device", "precision", "channels_last", "images_per_second", "versions", "train_config"):
        assert key in metrics
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trained_run.metrics.accuracy > 0.5  # far above the 10 % of chance on the synthetic classes


def test_checkpoint_is_plain_data_and_rebuilds_the_model(trained_run, batches_py):
    raw = torch.load(trained_run.checkpoint, weights_only=True)  # would raise on pickled objects
    for key in (
        "artifact",
        "model_kwargs",
        "model_state",
        "train_config",
        "epoch",
        "optimizer_state",
        "metrics",
        "history",
        "versions",
    ):
        assert key in raw
    assert raw["epoch"] == 2 and [r["epoch"] for r in raw["history"]] == [1, 2]
    assert raw["artifact"]["mean"] == list(BLOG_MEAN) and raw["artifact"]["model_name"] == "blog_cnn"
    state = Checkpoint.load(trained_run.checkpoint)
    model = state.deployed()  # the normalization comes from the checkpoint
    x, y = synthetic_images(1200)  # the same generator and seed as the fixture's data set
    metrics = evaluate(model, x[1000:], y[1000:], state.class_names, device=CPU)
    assert metrics.accuracy == pytest.approx(trained_run.metrics.accuracy)
    assert raw["artifact"]["test_accuracy"] == pytest.approx(metrics.accuracy)


def test_evaluate_refuses_a_bare_net():
    """A bare net has no normalization: evaluate() must not guess the blog's."""
    x, y = synthetic_images(8)
    with pytest.raises(TypeError, match="DeployedModel"):
        evaluate(BlogCNN(), x, y, tuple(map(str, range(10))), device=CPU)


def test_same_seed_same_run_on_cpu(tmp_path, batches_py):
    runs = [
        train(TrainConfig(data=str(batches_py), epochs=1, out=str(tmp_path / f"r{i}"), device="cpu")) for i in range(2)
    ]
    a, b = (Checkpoint.load(r.checkpoint).model_state for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(TrainConfig(data=str(batches_py), epochs=1, seed=1, out=str(tmp_path / "r2"), device="cpu"))
    c = Checkpoint.load(other.checkpoint).model_state
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _KillAfter(Silent):
    """Simulates a run killed after `epochs` complete epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def phase(self, name, total=None):
        if name.startswith(f"epoch {self.epochs + 1}/"):
            raise KeyboardInterrupt


def test_killed_run_resumes_to_the_same_final_state(tmp_path, batches_py):
    straight = train(TrainConfig(data=str(batches_py), epochs=3, out=str(tmp_path / "straight"), device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(batches_py), epochs=3, out=str(tmp_path / "killed"), device="cpu"), _KillAfter(2))
    killed = tmp_path / "killed" / "checkpoint.pt"
    assert Checkpoint.load(killed).epoch == 2
    with pytest.raises(CifarkitError, match="pass --data"):  # a data path is never read from a checkpoint
        train(TrainConfig(resume=str(killed), device="cpu"))
    # No --epochs: the interrupted run continues to its own target (3), not to the recipe's default (4).
    resumed = train(TrainConfig(resume=str(killed), data=str(batches_py), device="cpu"))
    assert resumed.out_dir == tmp_path / "killed" and resumed.epochs_run == 1
    a = Checkpoint.load(straight.checkpoint)
    b = Checkpoint.load(resumed.checkpoint)
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [r["losses"] for r in b.history] == [r["losses"] for r in a.history]
    assert resumed.metrics.accuracy == straight.metrics.accuracy
    with pytest.raises(CifarkitError, match="already holds 3 epochs"):
        train(TrainConfig(resume=str(resumed.checkpoint), data=str(batches_py), device="cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "--epochs must be a positive number"),
        ({"epochs": -2.5}, "--epochs must be a positive number"),
        ({"lr": -0.1}, "--lr must be a positive number"),
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"batch_size": 0}, "--batch-size must be 1 to 65,536"),
        ({"batch_size": 10**9}, "--batch-size must be 1 to 65,536"),
        ({"threads": 100_000}, "--threads must be 1 to 256"),
        ({"epochs": 1e9}, "--epochs must be a positive number up to 10,000"),
        ({"eval_batch_size": 10**7}, "--eval-batch-size must be 1 to 65,536"),
        ({"precision": "fp8"}, "--precision"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, batches_py, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(CifarkitError, match=message):
        train(TrainConfig(data=str(batches_py), out=str(out), **overrides))
    assert not out.exists()


def test_failed_run_leaves_no_empty_run_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CifarkitError, match="does not exist"):
        train(TrainConfig(data=str(tmp_path / "nowhere"), out=str(out)))
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda():
    with pytest.raises(CifarkitError, match="CUDA is not available"):
        select_device("cuda")


def test_corrupt_and_foreign_checkpoints(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CifarkitError, match="garbage.pt cannot be read"):
        Checkpoint.load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CifarkitError, match="not a cifarkit checkpoint"):
        Checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(CifarkitError, match="does not exist"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_run_numpy_matches_evaluate(trained_run):
    state = Checkpoint.load(trained_run.checkpoint)
    x, y = synthetic_images(1200)
    logits, _ = state.deployed().run_numpy(x[1000:], batch_size=64)
    assert float(np.mean(logits.argmax(1) == y[1000:])) == pytest.approx(trained_run.metrics.accuracy)
    assert isinstance(state.model(), BlogCNN)


def test_one_real_epoch_is_far_above_chance(real_run):
    # The blog recipe's first epoch reaches about 55 %; chance is 10 %.
    assert real_run.metrics.count == 10_000
    assert real_run.metrics.accuracy > 0.45
