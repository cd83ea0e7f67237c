"""The checkpoint format: plain data, the contract as one dict, and version 1 files upgraded on load."""

from __future__ import annotations

import torch

from cifarkit.checkpoint import checkpoint_meta, deployed_from_checkpoint, load_checkpoint
from cifarkit.spec import BLOG_MEAN, ArtifactMeta
from conftest import synthetic_images


def _as_version_1(state: dict) -> dict:
    """What cifarkit 0.1.0 wrote: the contract as loose keys, history as parallel lists."""
    art = state["artifact"]
    history = state["history"]
    old = {k: v for k, v in state.items() if k not in ("artifact", "history", "runtime")}
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


def test_version_1_checkpoints_are_upgraded(trained_run, tmp_path):
    current = load_checkpoint(trained_run.checkpoint)
    torch.save(_as_version_1(current), tmp_path / "v1.pt")
    upgraded = load_checkpoint(tmp_path / "v1.pt")
    assert upgraded["format_version"] == 2 and "class_names" not in upgraded and "mean" not in upgraded
    assert checkpoint_meta(upgraded) == checkpoint_meta(current)
    assert [r["losses"] for r in upgraded["history"]] == [r["losses"] for r in current["history"]]
    assert [r["epoch"] for r in upgraded["history"]] == [1, 2]
    x, _ = synthetic_images(64, seed=5)
    a, _ = deployed_from_checkpoint(current).run_numpy(x)
    b, _ = deployed_from_checkpoint(upgraded).run_numpy(x)
    assert (a == b).all()


def test_version_1_without_normalization_keys_meant_the_blogs(trained_run, tmp_path):
    old = _as_version_1(load_checkpoint(trained_run.checkpoint))
    del old["mean"], old["std"]
    torch.save(old, tmp_path / "v1.pt")
    assert checkpoint_meta(load_checkpoint(tmp_path / "v1.pt")).mean == BLOG_MEAN


def test_the_contract_round_trips_as_plain_data():
    meta = ArtifactMeta(class_names=("a", "b"), model_name="blog_cnn", mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    data = meta.to_dict()
    assert data["class_names"] == ["a", "b"] and data["mean"] == [0.1, 0.2, 0.3]
    assert ArtifactMeta.from_dict(data) == meta
    assert ArtifactMeta.from_props(meta.to_props()) == meta == ArtifactMeta.from_json(meta.to_json())
