"""The checkpoint: one typed, frozen value (cifarkit.model.checkpoint.Checkpoint) stored as plain data, the
contract as one dict, and version 1 files upgraded on load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cifarkit.model.checkpoint import Checkpoint
from cifarkit.spec import BLOG_MEAN, ArtifactMeta
from conftest import synthetic_images


def _as_version_1(state: dict) -> dict:
    """What cifarkit 0.1.0 wrote: the contract as loose keys, history as parallel lists."""
    art = state["artifact"]
    history = state["history"]
    old = {k: v for k, v in state.items() if k not in ("artifact", "history", "runtime", "step", "plan")}
    old.update(
        format_version=1,
        model_name=art["model_name"],
        class_names=art["class_names"],
        image_size=art["image_size"],
        mean=art["mean"],
        std=art["std"],
        resize_mode=art["resize_mode"],
        resize_filter=art["resize_filter"],
        tta=art["tta"],
        history={
            "loss": [loss for r in history for loss in r["losses"]],
            "epoch_seconds": [r["seconds"] for r in history],
            "images_per_second": [r["images_per_second"] for r in history],
            "test_accuracy": [r["test_accuracy"] for r in history],
            "test_loss": [r["test_loss"] for r in history],
            "elapsed_seconds": [r["elapsed"] for r in history],
        },
    )
    return old


def test_the_file_is_plain_data_and_round_trips(trained_run, tmp_path):
    raw = torch.load(trained_run.checkpoint, weights_only=True)  # plain data: no pickled object
    assert raw["format"] == "cifarkit.checkpoint" and raw["format_version"] == 2
    ckpt = Checkpoint.load(trained_run.checkpoint)
    assert ckpt.epoch == 2 and ckpt.step == 2 * 32 and ckpt.model_name == "blog_cnn"
    ckpt.save(tmp_path / "again.pt")
    again = Checkpoint.load(tmp_path / "again.pt")
    assert again.artifact == ckpt.artifact and again.history == ckpt.history and again.plan == ckpt.plan
    assert all(torch.equal(again.model_state[k], v) for k, v in ckpt.model_state.items())


def test_a_loaded_checkpoint_is_frozen(trained_run):
    ckpt = Checkpoint.load(trained_run.checkpoint)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.epoch = 99  # type: ignore[misc]


def test_version_1_checkpoints_are_upgraded(trained_run, tmp_path):
    current = Checkpoint.load(trained_run.checkpoint)
    torch.save(_as_version_1(current.to_dict()), tmp_path / "v1.pt")
    upgraded = Checkpoint.load(tmp_path / "v1.pt")
    raw = upgraded.to_dict()
    assert raw["format_version"] == 2 and "class_names" not in raw and "mean" not in raw
    assert upgraded.artifact == current.artifact
    assert [r["losses"] for r in upgraded.history] == [r["losses"] for r in current.history]
    assert [r["epoch"] for r in upgraded.history] == [1, 2]
    x, _ = synthetic_images(64, seed=5)
    a, _ = current.deployed().run_numpy(x)
    b, _ = upgraded.deployed().run_numpy(x)
    assert (a == b).all()


def test_version_1_without_normalization_keys_meant_the_blogs(trained_run, tmp_path):
    old = _as_version_1(Checkpoint.load(trained_run.checkpoint).to_dict())
    del old["mean"], old["std"]
    torch.save(old, tmp_path / "v1.pt")
    assert Checkpoint.load(tmp_path / "v1.pt").artifact.mean == BLOG_MEAN


def test_the_contract_round_trips_as_plain_data():
    meta = ArtifactMeta(class_names=("a", "b"), model_name="blog_cnn", mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    data = meta.to_dict()
    assert data["class_names"] == ["a", "b"] and data["mean"] == [0.1, 0.2, 0.3]
    assert ArtifactMeta.from_dict(data) == meta
    assert ArtifactMeta.from_props(meta.to_props()) == meta == ArtifactMeta.from_json(meta.to_json())
