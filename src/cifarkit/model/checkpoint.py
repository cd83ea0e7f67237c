"""The checkpoint: one typed value (`Checkpoint`) that rebuilds its model alone and carries the artifact contract,
stored as plain data.

`torch.load(path, weights_only=True)` reads the file: tensors, numbers, strings, lists and dicts, never a pickled
object. Layout (format version 2), the keys of `Checkpoint.to_dict()`:

    format, format_version     "cifarkit.checkpoint", 2
    artifact                   ArtifactMeta.to_dict(): class names, model name, normalization, image size,
                               resize rule, TTA, test accuracy; export copies it into the artifacts
    model_kwargs               constructor arguments beyond num_classes
    model_state                the net's state_dict (CPU, contiguous)
    recipe, train_config       what trained it (asdict of Recipe and TrainConfig)
    epoch, step, plan          epochs and optimizer steps completed; a time-budgeted run's fitted schedule
    optimizer_state, lookahead_state   for --resume
    history                    one record a completed epoch (train.report.EpochRecord as a dict)
    metrics                    the latest test evaluation (train.report.Metrics as a dict), or None
    data_source, runtime, versions     provenance

Version 1 files (the contract as loose top-level keys, history as parallel lists) are upgraded on load. Every
reader (export, evaluation, --resume) goes through `Checkpoint.load`, which checks each field's type and then
the model itself on the meta device: its arguments, its weights' names and shapes, and the recorded image size
against the sides the net takes. A checkpoint that would fail later fails here, in one line, before anything is
allocated or written.

    ckpt = Checkpoint.load("runs/blog/checkpoint.pt")
    deployed = ckpt.deployed()          # DeployedModel: uint8 images in, logits and probabilities out
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cifarkit.atomic import atomic_path
from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import regular_file_problem
from cifarkit.model.deployed import DeployedModel
from cifarkit.model.nets import Net, build_model, meta_model
from cifarkit.spec import IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE, ArtifactMeta

CHECKPOINT_FORMAT = "cifarkit.checkpoint"
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """A training run's state, frozen: readers never change it, and a resumed run writes a new one."""

    artifact: ArtifactMeta  # the contract every export carries
    model_state: Mapping[str, torch.Tensor]  # the net's weights and buffers, on the CPU
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # constructor arguments beyond num_classes
    epoch: int = 0  # epochs completed
    step: int | None = None  # optimizer steps completed (None in files written before it was recorded)
    plan: Mapping[str, Any] | None = None  # train.budget.Progress.to_dict(): knots beyond (0, 0) = a fitted budget
    recipe: Mapping[str, Any] | None = None  # asdict(Recipe)
    train_config: Mapping[str, Any] | None = None  # asdict(TrainConfig)
    optimizer_state: Mapping[str, Any] | None = None
    lookahead_state: Mapping[str, torch.Tensor] | None = None
    history: tuple[Mapping[str, Any], ...] = ()  # one EpochRecord dict a completed epoch
    metrics: Mapping[str, Any] | None = None  # the latest test evaluation (Metrics as a dict)
    data_source: str | None = None
    runtime: Mapping[str, Any] | None = None
    versions: Mapping[str, str] | None = None
    source: str = field(default="", compare=False)  # the file it was read from, for messages ("" when built)

    @property
    def model_name(self) -> str:
        return self.artifact.model_name

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.artifact.class_names)

    # ---- plain data ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """What torch.save writes: plain data only."""
        out: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "source":
                continue
            if f.name == "artifact":
                value = value.to_dict()
            elif f.name == "history":
                value = [dict(r) for r in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, state: Any, source: str = "<checkpoint>") -> Checkpoint:
        """The checked, upgraded value of a plain-data checkpoint (CifarkitError naming `source` otherwise)."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CifarkitError(f"checkpoint {source} is not a cifarkit checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
        version = state.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CifarkitError(f"checkpoint {source} has a bad format_version {version!r}")
        if version > CHECKPOINT_VERSION:
            raise CifarkitError(
                f"checkpoint {source} has format version {version}, this cifarkit reads up to "
                f"{CHECKPOINT_VERSION}; upgrade cifarkit"
            )
        try:
            if version < 2:
                state = _upgrade_v1(state, source)
            _check_fields(state)
            artifact = ArtifactMeta.from_dict(state["artifact"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CifarkitError(f"checkpoint {source} is malformed: {first_line(exc, 160)}") from None
        known = {f.name for f in fields(cls)} - {"artifact", "history", "source"}
        values = {k: v for k, v in state.items() if k in known and v is not None}
        ckpt = cls(artifact=artifact, history=tuple(state.get("history") or ()), source=source, **values)
        ckpt.check_model()
        return ckpt

    # ---- files -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Read a cifarkit checkpoint with weights_only=True, upgraded and checked (see the module's docstring).
        Missing, irregular, corrupt or foreign files are CifarkitErrors naming the file. Reading changes no file."""
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
        return cls.from_dict(state, str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temporary file in the same folder, then rename. A crash leaves the old file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)

    # ---- the model it rebuilds -------------------------------------------------------------------------

    def check_model(self) -> None:
        """The model this checkpoint describes, built on the meta device (nothing allocated, nothing run): its
        arguments are accepted, its weights have the names and shapes of the net's (so its classifier gives one
        logit per class), and it takes images of the recorded size (Net.side_range). A CifarkitError naming the
        file otherwise."""
        name, classes = self.model_name, len(self.class_names)
        if "num_classes" in self.model_kwargs:
            raise CifarkitError(
                f"checkpoint {self.source}: model_kwargs sets 'num_classes', which cifarkit takes from the "
                f"{classes} class names"
            )
        try:
            net = meta_model(name, classes, **self.model_kwargs)
        except CifarkitError as exc:
            raise CifarkitError(f"checkpoint {self.source}: {exc}") from None
        _check_state(net, self.model_state, name, self.source)
        h, w = self.artifact.image_size
        sides = net.side_range()
        if sides is not None and not (sides[0] <= h <= sides[1] and sides[0] <= w <= sides[1]):
            raise CifarkitError(
                f"checkpoint {self.source}: its image size {h}x{w} does not fit model {name!r}, which takes sides "
                f"of {sides[0]} to {sides[1]} pixels"
            )

    def model(self) -> Net:
        """The net with its weights, in eval mode, fp32, on the CPU."""
        model = build_model(self.model_name, num_classes=len(self.class_names), **self.model_kwargs)
        load_weights(model, self.model_state, self.model_name)
        return model.eval()

    def deployed(self) -> DeployedModel:
        """The module every artifact contains (uint8 images in; normalization and TTA as the checkpoint says)."""
        meta = self.artifact
        return DeployedModel(self.model(), meta.mean, meta.std, tta=meta.tta).eval()


def load_weights(model: Net, weights: Mapping[str, torch.Tensor], model_name: str) -> None:
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Checks and the version-1 upgrade
# ---------------------------------------------------------------------------------------------------------


def _check_state(net: Net, weights: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """The weights name exactly the net's tensors, each with the net's shape."""
    want = net.state_dict()
    missing = [k for k in want if k not in weights]
    extra = [k for k in weights if k not in want]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the net does not"
        more = len(missing) + len(extra) - 1
        raise CifarkitError(
            f"checkpoint weights do not fit model {name!r}: the state {what}" + (f" (and {more} more)" if more else "")
        )
    for key, tensor in want.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CifarkitError(
                f"checkpoint weights do not fit model {name!r}: {key!r} is {list(weights[key].shape)}, the net's "
                f"is {list(tensor.shape)} ({source})"
            )


def _load_error(exc: Exception) -> str:
    """torch.load's failure in one sentence of ours (its own messages run to paragraphs)."""
    text = str(exc)
    refused = ("Weights only load failed", "Unsupported global", "unsupported GLOBAL", "WeightsUnpickler")
    if any(marker in text for marker in refused):
        return "it holds pickled Python objects, not plain data (refusing to unpickle them)"
    corrupt = ("invalid load key", "zip archive", "central directory", "PytorchStreamReader")
    if any(marker in text for marker in corrupt):
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
    "step": ((int,), True),
    "plan": ((dict,), True),
    "optimizer_state": ((dict,), True),
    "lookahead_state": ((dict,), True),
    "history": ((list,), True),
    "metrics": ((dict,), True),
    "data_source": ((str,), True),
}
_REQUIRED = ("artifact", "model_kwargs", "model_state")


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
    for key in ("epoch", "step"):
        if state.get(key) is not None and state[key] < 0:
            raise ValueError(f"field {key!r} is {state[key]}, expected 0 or more")
    history = state.get("history") or []
    if not all(isinstance(r, dict) and isinstance(r.get("losses", []), list) for r in history):
        raise TypeError("field 'history' must be a list of per-epoch records")
    config = state.get("train_config") or {}
    epochs = config.get("epochs")
    if epochs is not None and not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool)):
        raise TypeError(f"field 'train_config.epochs' is {type(epochs).__name__}, expected a number")


def _upgrade_v1(state: dict[str, Any], source: str) -> dict[str, Any]:
    """Version 1 kept the contract as loose keys (the blog's normalization when absent) and the history as
    parallel per-epoch lists plus one list of every batch's loss."""
    missing = [k for k in ("model_name", "class_names") if k not in state]
    if missing:
        raise CifarkitError(f"checkpoint {source} is incomplete: missing {', '.join(missing)}")
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
