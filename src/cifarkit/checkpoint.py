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
from cifarkit.files import regular_file_problem
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
    """Read a cifarkit checkpoint with weights_only=True, upgraded to the current format version, every field
    checked for its type. Missing, irregular, corrupt or foreign files are CifarkitErrors naming the file."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem == "no such file or folder":
        raise CifarkitError(f"checkpoint {path} does not exist")
    if problem is not None:
        raise CifarkitError(f"checkpoint {path}: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CifarkitError(f"checkpoint {path} cannot be read: {_load_error(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CifarkitError(f"checkpoint {path} is not a cifarkit checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    version = state.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CifarkitError(f"checkpoint {path} has a bad format_version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CifarkitError(
            f"checkpoint {path} has format version {version}, this cifarkit reads up to "
            f"{CHECKPOINT_VERSION}; upgrade cifarkit"
        )
    try:
        if version < 2:
            state = _upgrade_v1(state, path)
        _check_fields(state)
        ArtifactMeta.from_dict(state["artifact"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CifarkitError(f"checkpoint {path} is malformed: {first_line(exc, 160)}") from None
    return state


def _load_error(exc: Exception) -> str:
    """torch.load's failure in one sentence of ours (its own messages run to paragraphs)."""
    text = str(exc)
    refused = ("Weights only load failed", "Unsupported global", "unsupported GLOBAL", "WeightsUnpickler")
    if any(marker in text for marker in refused):
        return "it holds pickled Python objects, not plain data (refusing to unpickle them)"
    if (
        "invalid load key" in text
        or "zip archive" in text
        or "central directory" in text
        or "PytorchStreamReader" in text
    ):
        return "not a PyTorch checkpoint, or the file is corrupt or truncated"
    if isinstance(exc, (EOFError, RecursionError, MemoryError)):
        return f"not a PyTorch checkpoint, or the file is corrupt or truncated ({type(exc).__name__})"
    return first_line(exc, 160)


# field -> (accepted types, may be None)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "artifact": ((dict,), False),
    "model_kwargs": ((dict,), False),
    "model_state": ((dict,), False),
    "recipe": ((dict,), True),
    "train_config": ((dict,), True),
    "epoch": ((int,), True),
    "optimizer_state": ((dict,), True),
    "lookahead_state": ((dict,), True),
    "history": ((list,), True),
    "metrics": ((dict,), True),
}


def _check_fields(state: dict[str, Any]) -> None:
    """Each field has the type cifarkit writes: a crafted plain-data file must fail here, with its field
    named, not deep inside training or export."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for key, (types, optional) in _FIELDS.items():
        value = state.get(key)
        if value is None and (optional or key not in state):
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise TypeError(f"field {key!r} is {type(value).__name__}, expected {types[0].__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model_state"].items()):
        raise TypeError("field 'model_state' must map parameter names to tensors")
    if not all(isinstance(k, str) for k in state["model_kwargs"]):
        raise TypeError("field 'model_kwargs' must map argument names to values")
    if state.get("epoch") is not None and state["epoch"] < 0:
        raise ValueError(f"field 'epoch' is {state['epoch']}, expected 0 or more")
    history = state.get("history") or []
    if not all(isinstance(r, dict) and isinstance(r.get("losses", []), list) for r in history):
        raise TypeError("field 'history' must be a list of per-epoch records")
    config = state.get("train_config") or {}
    epochs = config.get("epochs")
    if epochs is not None and not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool)):
        raise TypeError(f"field 'train_config.epochs' is {type(epochs).__name__}, expected a number")


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
    load_weights(model, state["model_state"], meta.model_name)
    return model.eval()


def load_weights(model: Net, weights: dict[str, torch.Tensor], model_name: str) -> None:
    """Load a state dict that must fit the model exactly and hold only finite numbers (a diverged or
    doctored checkpoint must not be exported as "verified")."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CifarkitError(f"checkpoint weights do not fit model {model_name!r}: {first_line(exc, 160)}") from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CifarkitError(
                f"checkpoint weights hold NaN or Inf (in {name!r}): the run diverged, or the file is damaged"
            )


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
