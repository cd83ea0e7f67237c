"""What an export needs: `ExportConfig` and its checks. Pure Python: `cifar-export` builds its options from this
dataclass and answers a typo or a missing checkpoint before torch is imported.

    cfg = ExportConfig(checkpoint="runs/blog/checkpoint.pt", format="onnx", out="artifacts/")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cifarkit.errors import CifarkitError
from cifarkit.files import regular_file_problem
from cifarkit.stage import argument, option

FORMATS = ("onnx", "torchscript")  # what --format all writes
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 7, 23


@dataclass(frozen=True)
class ExportConfig:
    """An export of one checkpoint. Each option's flag is cifar-export's."""

    checkpoint: str = argument(help="checkpoint.pt written by cifar-train.", metavar="CHECKPOINT")
    format: str = option("all", "--format", "-f", help="onnx, torchscript or all.")  # noqa: A003
    out: str | None = option(  # None: the checkpoint's folder
        None, "--out", "-o", help="Output folder (default: the checkpoint's folder)."
    )
    opset: int = option(DEFAULT_OPSET, "--opset", help=f"ONNX opset version ({MIN_OPSET} to {MAX_OPSET}).")
    data: str | None = option(  # None: a fixed seeded random batch
        None,
        "--data",
        help="Verify on real test images from this source (an ImageFolder root, a cifar-10-batches-py folder, "
        "'sample') instead of a fixed random batch.",
    )
    data_dir: str | None = option(None, "--data-dir", help="Decoded-image cache folder.")
    verify_count: int = 256  # images each artifact is compared on (the first of --data's test split)

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS if self.format == "all" else (self.format,)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.checkpoint).parent

    def validate(self) -> None:
        """The options' own rules and the checkpoint's presence, before torch is imported (CifarkitError)."""
        if self.format != "all" and self.format not in FORMATS:
            raise CifarkitError(f"--format must be onnx, torchscript or all: unknown format {self.format!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise CifarkitError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {self.opset}")
        if self.verify_count < 1:
            raise CifarkitError(f"verify_count must be at least 1, got {self.verify_count}")
        problem = regular_file_problem(self.checkpoint)
        if problem == "no such file or folder":
            raise CifarkitError(f"checkpoint {self.checkpoint} does not exist")
        if problem is not None:
            raise CifarkitError(f"checkpoint {self.checkpoint}: {problem}")
