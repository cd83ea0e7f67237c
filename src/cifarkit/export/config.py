"""What an export needs: `ExportConfig` and its checks. Pure Python: `cifar-export` builds its options from this
dataclass and answers a typo or a missing checkpoint before torch is imported.

    cfg = ExportConfig(checkpoint="runs/blog/checkpoint.pt", format="onnx", out="artifacts/")
    cfg = ExportConfig(checkpoint="runs/air/checkpoint.pt", quantize="int8", data="/data/cifar10")   # int8, verified
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cifarkit.errors import CifarkitError
from cifarkit.files import regular_file_problem
from cifarkit.spec import TTA_MODES
from cifarkit.stage import argument, option

FORMATS = ("onnx", "torchscript")  # what --format all writes
ALL_FORMATS = ("all", *FORMATS, "triton")
QUANTIZATIONS = ("none", "int8")
PRECISIONS = ("fp32", "fp16")
TTA_CHOICES = ("recipe", *TTA_MODES)  # "recipe": what the checkpoint carries
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 7, 23
EXACT_VERIFY_IMAGES = 256  # images an exact artifact (fp32, the recipe's TTA) is compared on, logit for logit
MAX_CALIBRATION_IMAGES = 50_000


@dataclass(frozen=True)
class ExportConfig:
    """An export of one checkpoint. Each option's flag is cifar-export's."""

    checkpoint: str = argument(help="checkpoint.pt written by cifar-train.", metavar="CHECKPOINT")
    format: str | None = option(  # noqa: A003 (None: all, or onnx for an int8 or fp16 model: see `kind`)
        None,
        "--format",
        "-f",
        help="onnx, torchscript, all (both), or triton (a Triton model repository in --out). Default: all; onnx "
        "for --quantize int8 or --precision fp16, which make ONNX models only.",
    )
    out: str | None = option(  # None: the checkpoint's folder, or a folder named after the variant inside it
        None,
        "--out",
        "-o",
        help="Output folder (default: the checkpoint's folder; for an int8, fp16 or re-augmented model a folder "
        "named after it there, e.g. int8/; for triton the repository triton/ there).",
    )
    opset: int = option(DEFAULT_OPSET, "--opset", help=f"ONNX opset version ({MIN_OPSET} to {MAX_OPSET}).")
    quantize: str = option(
        "none",
        "--quantize",
        help="none, or int8: static quantization (QDQ, int8 per-channel weights, uint8 activations, BatchNorm folded "
        "first), calibrated on training images of --data.",
    )
    precision: str = option("fp32", "--precision", help="fp32, or fp16: weights stored in half precision.")
    tta: str = option(  # test-time augmentation inside the graph
        "recipe",
        "--tta",
        help="Test-time augmentation inside the graph: recipe (the checkpoint's), none, hflip, hflip_translate.",
    )
    max_drop: float = option(  # accuracy points
        0.5,
        "--max-drop",
        help="An int8, fp16 or re-augmented model is written only if its accuracy on the labelled test images is "
        "at most this many points below the fp32 model's.",
    )
    data: str | None = option(  # None: a fixed seeded random batch (exact exports only)
        None,
        "--data",
        help="Labelled images (an ImageFolder root, a cifar-10-batches-py folder, 'sample'): the test split to "
        "verify on (every image for a model that cannot match fp32 exactly), the training split to calibrate int8 "
        "on. Without it an exact export is verified on a fixed random batch.",
    )
    data_dir: str | None = option(None, "--data-dir", help="Decoded-image cache folder.")
    calibration_images: int = option(  # images
        512, "--calibration-images", help="Training images int8 calibration sees (a seeded draw, even over classes)."
    )
    verify_images: int | None = option(  # None: 256 for an exact model, the whole test split otherwise
        None, "--verify-images", help="Test images to verify on (default: 256 exact, all of them otherwise)."
    )
    triton_name: str | None = option(None, "--triton-name", help="The model's name in a Triton repository.")
    speed: bool = option(True, "--speed/--no-speed", help="Measure each artifact's images/s for the closing table.")

    @property
    def kind(self) -> str:
        """--format as given, or its default: all, or onnx for a compressed model (the only kind one can be)."""
        if self.format is not None:
            return self.format
        return "onnx" if self.quantize != "none" or self.precision != "fp32" else "all"

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS if self.kind == "all" else (self.kind,)

    @property
    def lossy(self) -> bool:
        """Whether the artifact may differ from the fp32 model: then it is gated on labelled accuracy."""
        return self.quantize != "none" or self.precision != "fp32" or self.tta != "recipe"

    @property
    def variant_name(self) -> str:
        """The folder name of a variant: "int8", "fp16", "tta-none", "int8-tta-hflip"; "" for the fp32 model."""
        parts = [p for p in (self.quantize if self.quantize != "none" else "", self.precision) if p not in ("", "fp32")]
        if self.tta != "recipe":
            parts.append(f"tta-{self.tta}")
        return "-".join(parts)

    @property
    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        base = Path(self.checkpoint).parent
        if self.kind == "triton":
            return base / "triton"
        return base / self.variant_name if self.variant_name else base

    def validate(self) -> None:
        """The options' own rules and the checkpoint's presence, before torch is imported (CifarkitError)."""
        if self.kind not in ALL_FORMATS:
            raise CifarkitError(f"--format must be onnx, torchscript or all (or triton): unknown format {self.kind!r}")
        self._check_choices()
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise CifarkitError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {self.opset}")
        if not (math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100):
            raise CifarkitError(f"--max-drop must be 0 to 100 accuracy points, got {self.max_drop}")
        if not 1 <= self.calibration_images <= MAX_CALIBRATION_IMAGES:
            raise CifarkitError(
                f"--calibration-images must be 1 to {MAX_CALIBRATION_IMAGES:,}, got {self.calibration_images}"
            )
        if self.verify_images is not None and self.verify_images < 1:
            raise CifarkitError(f"--verify-images must be at least 1, got {self.verify_images}")
        if self.triton_name is not None and not _plain_name(self.triton_name):
            raise CifarkitError(f"--triton-name must be letters, digits, '_', '-' or '.', got {self.triton_name!r}")
        problem = regular_file_problem(self.checkpoint)
        if problem == "no such file or folder":
            raise CifarkitError(f"checkpoint {self.checkpoint} does not exist")
        if problem is not None:
            raise CifarkitError(f"checkpoint {self.checkpoint}: {problem}")

    def _check_choices(self) -> None:
        if self.quantize not in QUANTIZATIONS:
            raise CifarkitError(f"--quantize must be none or int8, got {self.quantize!r}")
        if self.precision not in PRECISIONS:
            raise CifarkitError(f"--precision must be fp32 or fp16, got {self.precision!r}")
        if self.tta not in TTA_CHOICES:
            raise CifarkitError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {self.tta!r}")
        if self.quantize != "none" and self.precision != "fp32":
            raise CifarkitError("--quantize int8 and --precision fp16 exclude each other: pick one")
        if (self.quantize != "none" or self.precision != "fp32") and self.kind not in ("onnx", "triton"):
            raise CifarkitError(
                f"--quantize and --precision make ONNX models: pass --format onnx or triton (not {self.kind})"
            )
        if self.lossy and not self.data:
            what = f"--quantize {self.quantize}" if self.quantize != "none" else (
                f"--precision {self.precision}" if self.precision != "fp32" else f"--tta {self.tta}"
            )  # fmt: skip
            raise CifarkitError(
                f"{what} makes a model that cannot match the fp32 one exactly: it is measured against it on labelled "
                "test images (and int8 calibrated on training images) before it is written; give them with --data"
            )


def _plain_name(name: str) -> bool:
    return 0 < len(name) <= 100 and all(c.isalnum() or c in "_-." for c in name) and name not in (".", "..")
