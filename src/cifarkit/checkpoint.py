"""The checkpoint: plain data that rebuilds its model alone and carries the artifact contract.

`torch.load(path, weights_only=True)` reads it: tensors, numbers, strings, lists and dicts, never a pickled
object. Layout (format version 2):

    format, format_version     "cifarkit.checkpoint", 2
    artifact                   ArtifactMeta.to_dict(): class names, model name, normalization, image size,
                               resize rule, TTA, test accuracy; export copies it into the artifacts
    model_kwargs               constructor arguments beyond num_classes
    model_state                the net's state_dict (CPU, contiguous)
    recipe, train_config       what trained it (asdict of Recipe and TrainConfig)
    epoch                      epochs completed
    optimizer_state, lookahead_state   for --resume
    history                    one record a completed epoch (train.EpochRecord as a dict)
    metrics                    the latest test evaluation (train.Metrics as a dict), or None
    data_source, runtime, versions     provenance

Version 1 files (the contract as loose top-level keys, history as parallel lists) are upgraded on load.

    state = load_checkpoint("runs/blog/checkpoint.pt")
    deployed = deployed_from_checkpoint(state)          # DeployedModel: uint8 images in, logits out
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from cifarkit.atomic import atomic_path
from cifarkit.errors import CifarkitError, first_line
from cifarkit.models import DeployedModel, Net, build_model
from cifarkit.spec import IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE, ArtifactMeta

CHECKPOINT_FORMAT = "cifarkit.checkpoint"
CHECKPOINT_VERSION = 2
_REQUIRED = ("artifact", "model_kwargs", "model_state")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then rename. A crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a cifarkit checkpoint with weights_only=True, upgraded to the current format version. Missing,
    corrupt or foreign files are CifarkitErrors."""
    path = Path(path)
    if not path.exists():
        raise CifarkitError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CifarkitError(f"checkpoint {path} is a folder, expected a checkpoint.pt file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:
            why = "it holds pickled Python objects, not plain data (refusing to unpickle them)"
        elif "WeightsUnpickler" in text or "invalid load key" in text or "zip archive" in text:
            why = "not a PyTorch checkpoint, or the file is corrupt or truncated"
        else:
            why = first_line(exc, 160)
        raise CifarkitError(f"checkpoint {path} cannot be read: {why}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CifarkitError(f"checkpoint {path} is not a cifarkit checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    version = state.get("format_version", 0)
    if version > CHECKPOINT_VERSION:
        raise CifarkitError(
            f"checkpoint {path} has format version {version}, this cifarkit reads up to "
            f"{CHECKPOINT_VERSION}; upgrade cifarkit"
        )
    if version < 2:
        state = _upgrade_v1(state, path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CifarkitError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        ArtifactMeta.from_dict(state["artifact"])
    except (ValueError, TypeError) as exc:
        raise CifarkitError(f"checkpoint {path} has a bad artifact contract: {first_line(exc, 160)}") from None
    return state


def _upgrade_v1(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Version 1 kept the contract as loose keys (the blog's normalization when absent) and the history as
    parallel per-epoch lists plus one list of every batch's loss."""
    missing = [k for k in ("model_name", "class_names") if k not in state]
    if missing:
        raise CifarkitError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    from cifarkit.spec import BLOG_MEAN, BLOG_STD  # version 1's implicit normalization

    acc = (state.get("metrics") or {}).get("accuracy")
    artifact = ArtifactMeta(
        class_names=tuple(state["class_names"]),
        model_name=state["model_name"],
        mean=tuple(state.get("mean", BLOG_MEAN)),
        std=tuple(state.get("std", BLOG_STD)),
        image_size=tuple(state.get("image_size", IMAGE_SIZE)),
        resize_mode=state.get("resize_mode", RESIZE_MODE),
        resize_filter=state.get("resize_filter", RESIZE_FILTER),
        tta=state.get("tta", "none"),
        test_accuracy=None if acc is None else round(float(acc), 6),
    )
    old = state.get("history") or {}
    epochs = len(old.get("epoch_seconds", []))
    losses = old.get("loss", [])
    per_epoch = math.ceil(len(losses) / epochs) if epochs else 0  # every epoch but a fractional last is full
    history = [
        {
            "epoch": i + 1,
            "losses": losses[i * per_epoch : (i + 1) * per_epoch],
            "seconds": old["epoch_seconds"][i],
            "images_per_second": old["images_per_second"][i],
            "test_accuracy": old["test_accuracy"][i],
            "test_loss": old["test_loss"][i],
            "elapsed": old["elapsed_seconds"][i],
        }
        for i in range(epochs)
    ]
    loose = ("model_name", "class_names", "mean", "std", "image_size", "resize_mode", "resize_filter", "tta")
    upgraded = {k: v for k, v in state.items() if k not in loose}
    upgraded.update(format_version=CHECKPOINT_VERSION, artifact=artifact.to_dict(), history=history)
    return upgraded


def checkpoint_meta(state: dict[str, Any]) -> ArtifactMeta:
    """The artifact contract a checkpoint carries."""
    return ArtifactMeta.from_dict(state["artifact"])


def model_from_checkpoint(state: dict[str, Any]) -> Net:
    """Rebuild the net from the checkpoint alone, weights loaded, in eval mode, fp32, on the CPU."""
    meta = checkpoint_meta(state)
    model = build_model(meta.model_name, num_classes=len(meta.class_names), **state["model_kwargs"])
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as exc:
        raise CifarkitError(
            f"checkpoint weights do not fit model {meta.model_name!r}: {first_line(exc, 160)}"
        ) from None
    return model.eval()


def deployed_from_checkpoint(state: dict[str, Any]) -> DeployedModel:
    """The module every artifact contains (uint8 images in; normalization and TTA as the checkpoint says)."""
    meta = checkpoint_meta(state)
    return DeployedModel(model_from_checkpoint(state), meta.mean, meta.std, tta=meta.tta).eval()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
