"""The artifact contract, defined once: class names, image size, normalization, metadata keys.

Pure Python (no torch, no numpy): the training, export and inference stages all build from it, and a test
checks that every exported artifact's metadata agrees with it. Normalization is named here but never a
default: a recipe picks a pair, the checkpoint records it, the artifact carries it.

    from cifarkit.spec import ArtifactMeta
    meta = ArtifactMeta.from_props(session.get_modelmeta().custom_metadata_map)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

# CIFAR-10's own label order, which is also the sorted order of the ImageFolder class folders.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_SIZE: tuple[int, int] = (32, 32)  # (height, width) in pixels
PIXEL_SCALE: float = 1.0 / 255.0  # ToTensor()'s scaling of uint8 pixels, before mean and std

# Normalizations, applied after PIXEL_SCALE, per channel (R, G, B).
# The blog's `Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))`: pixels to [-1, 1].
BLOG_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
BLOG_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# CIFAR-10's per-channel training-set statistics, as airbench normalizes.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

INPUT_NAME = "images"  # uint8 [N, H, W, 3], RGB
OUTPUT_NAMES: tuple[str, str] = ("logits", "probabilities")  # float32 [N, C] each
INPUT_LAYOUT = "NHWC"
INPUT_DTYPE = "uint8"
COLOR_ORDER = "RGB"

# How an image that is not H x W RGB reaches the model. One rule for training on an ImageFolder of other
# sizes and for inference; implemented once in cifarkit.preprocess and documented in the README.
#   center_crop: scale the shorter side to the target (keeping the aspect ratio), then cut the centre.
#   Chosen over squashing because photos are framed around their subject and CIFAR-10's objects were never
#   stretched; a 32x32 image passes through untouched either way.
RESIZE_MODE = "center_crop"  # "center_crop" | "squash"
RESIZE_FILTER = "bilinear"  # Pillow's antialiased bilinear (a triangle filter widened on downscaling)
RESIZE_MODES = ("center_crop", "squash")
RESIZE_FILTERS = ("bilinear", "bicubic", "nearest", "lanczos", "box")  # Pillow's antialiased resampling filters
TTA_MODES = ("none", "hflip", "hflip_translate")  # test-time augmentation inside the graph (models.DeployedModel)

MAX_CLASSES = 10_000  # a bound on class counts read from data, checkpoints and metadata
MAX_IMAGE_SIDE = 1024  # pixels; a bound on image_size read from a checkpoint or a model's metadata
MAX_VARIANT_JSON = 65_536  # characters: what an export records of how it made its artifact

SCHEMA = "cifarkit.artifact/1"
ARTIFACT_JSON_NAME = "model.json"  # the sidecar, and the extra file inside the TorchScript archive


@dataclass(frozen=True)
class ArtifactMeta:
    """What an exported model says about itself. Stored as ONNX metadata_props (string -> string), as
    the `model.json` sidecar and as an extra file in the TorchScript archive, all with the same content;
    a checkpoint carries it as a plain dict (`to_dict`), which export copies."""

    class_names: tuple[str, ...]
    model_name: str
    mean: tuple[float, ...]  # after pixel_scale, per channel; from the recipe
    std: tuple[float, ...]
    image_size: tuple[int, int] = IMAGE_SIZE
    pixel_scale: float = PIXEL_SCALE
    resize_mode: str = RESIZE_MODE
    resize_filter: str = RESIZE_FILTER
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = OUTPUT_NAMES
    input_layout: str = INPUT_LAYOUT
    input_dtype: str = INPUT_DTYPE
    color_order: str = COLOR_ORDER
    tta: str = "none"  # "none" | "hflip": test-time augmentation done inside the graph
    test_accuracy: float | None = None  # fraction in [0, 1], from the checkpoint's test metrics
    checkpoint_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # cifarkit, torch, onnx, ...
    # What an export made of the checkpoint's fp32 model, when it is not that model itself: "precision" ("fp16" or
    # "int8"), "quantization" (how: format, weights, activations, calibration images), "tta" (chosen at export)
    # and "verification" (accuracy against the fp32 model on labelled images, the drop, the classes agreed on).
    # Empty for the fp32 model with the recipe's TTA.
    variant: dict[str, object] = field(default_factory=dict)
    schema: str = SCHEMA

    # ---- plain-data form (checkpoints) ----------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """Every field as plain data (lists, not tuples): what a checkpoint stores."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ArtifactMeta:
        """Inverse of to_dict (unknown keys ignored); raises ValueError naming a missing or bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"metadata must be a mapping, got {type(data).__name__}")
        missing = sorted(_REQUIRED_KEYS - data.keys())
        if missing:
            raise ValueError(f"metadata key {missing[0]!r} is missing")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__}
        meta = cls(**kwargs)  # type: ignore[arg-type]
        meta.validate()
        return meta

    # ---- string-to-string form (ONNX metadata_props) -------------------------------------------------

    def to_props(self) -> dict[str, str]:
        """Every field as a string; lists and dicts as JSON so that any language can parse them."""
        out: dict[str, str] = {}
        for key, value in asdict(self).items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ArtifactMeta:
        """Inverse of to_props; raises ValueError naming the key that is missing or malformed."""
        data: dict[str, object] = {}
        for name in cls.__dataclass_fields__.keys() & props.keys():
            raw = props[name]
            if name in _STRING_KEYS:
                data[name] = raw
                continue
            try:
                data[name] = json.loads(raw)
            except (json.JSONDecodeError, RecursionError):
                raise ValueError(f"metadata key {name!r} is not valid JSON: {raw[:60]!r}") from None
        return cls.from_dict(data)

    # ---- JSON form (sidecar, TorchScript extra file) -------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ArtifactMeta:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"metadata is not valid JSON: {text[:60]!r}") from None
        if not isinstance(data, dict):
            raise ValueError("metadata JSON must be an object")
        return cls.from_dict(data)

    def validate(self) -> None:
        """Every field of the right type and within bounds (ValueError naming the key otherwise): metadata comes
        from files, and nothing may be allocated or trusted before it is checked."""
        if self.schema != SCHEMA:
            raise ValueError(f"metadata schema is {_short(self.schema)}, expected {SCHEMA!r}")
        names = self.class_names
        if not (isinstance(names, tuple) and 2 <= len(names) <= MAX_CLASSES):
            raise ValueError(f"metadata 'class_names' must list 2 to {MAX_CLASSES:,} classes")
        if not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names) or len(set(names)) != len(names):
            raise ValueError("metadata 'class_names' must be distinct non-empty strings of at most 200 characters")
        size = self.image_size
        if not (
            isinstance(size, tuple) and len(size) == 2 and all(_is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in size)
        ):
            raise ValueError(
                f"metadata 'image_size' must be [height, width], each 1 to {MAX_IMAGE_SIDE}, got {_short(size)}"
            )
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not (isinstance(v, tuple) and len(v) == 3 and all(_is_number(x) for x in v)):
                raise ValueError(f"metadata {key!r} must have 3 finite numbers (R, G, B), got {_short(v)}")
        if not all(x > 0 for x in self.std):
            raise ValueError(f"metadata 'std' must be positive, got {_short(self.std)}")
        if not (_is_number(self.pixel_scale) and self.pixel_scale > 0):
            raise ValueError(f"metadata 'pixel_scale' must be a positive number, got {_short(self.pixel_scale)}")
        for key, allowed in (("resize_mode", RESIZE_MODES), ("resize_filter", RESIZE_FILTERS), ("tta", TTA_MODES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"metadata {key!r} is {_short(getattr(self, key))}, expected one of {allowed}")
        for key in ("model_name", "input_name", "input_layout", "input_dtype", "color_order", "checkpoint_sha256"):
            if not (isinstance(getattr(self, key), str) and len(getattr(self, key)) <= 200):
                raise ValueError(f"metadata {key!r} must be a string of at most 200 characters")
        outs = self.output_names
        if not (isinstance(outs, tuple) and 1 <= len(outs) <= 8 and all(isinstance(o, str) for o in outs)):
            raise ValueError(f"metadata 'output_names' must be a list of names, got {_short(outs)}")
        acc = self.test_accuracy
        if acc is not None and not (_is_number(acc) and 0 <= acc <= 1):
            raise ValueError(f"metadata 'test_accuracy' must be a fraction in [0, 1] or null, got {_short(acc)}")
        variant = self.variant
        if not (isinstance(variant, dict) and all(isinstance(k, str) for k in variant)):
            raise ValueError("metadata 'variant' must map names to values")
        if len(json.dumps(variant, default=str)) > MAX_VARIANT_JSON:
            raise ValueError(f"metadata 'variant' is over {MAX_VARIANT_JSON:,} characters of JSON")
        vers = self.versions
        if not (
            isinstance(vers, dict)
            and len(vers) <= 50
            and all(isinstance(k, str) and isinstance(v, str) for k, v in vers.items())
        ):
            raise ValueError("metadata 'versions' must map package names to version strings")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_REQUIRED_KEYS = frozenset({"class_names", "model_name", "mean", "std", "schema"})
# Fields stored as bare strings in metadata_props; every other field is JSON.
_STRING_KEYS = frozenset(
    {
        "model_name",
        "resize_mode",
        "resize_filter",
        "input_name",
        "input_layout",
        "input_dtype",
        "color_order",
        "tta",
        "checkpoint_sha256",
        "schema",
    }
)


def versions(*packages: str) -> dict[str, str]:
    """cifarkit's version and each of `packages`' ("python" for the interpreter): the version of the module
    running in this process where it is imported (torch's says which build, e.g. "2.14.1+cpu"), else the
    installed distribution's. Imports nothing, so the torch-free path can record versions too."""
    import importlib.metadata
    import platform
    import sys

    from cifarkit import __version__

    out = {"cifarkit": __version__}
    for name in packages:
        if name == "python":
            out[name] = platform.python_version()
        elif name in sys.modules and hasattr(sys.modules[name], "__version__"):
            out[name] = str(sys.modules[name].__version__)  # str(): torch's is a TorchVersion object
        else:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = "not installed"
    return out
