"""What an evaluation needs: `EvalConfig` and its checks. No numpy, no torch: `cifar-eval` builds its options from
this dataclass and answers a bad option before it loads a model.

    cfg = EvalConfig(model="runs/demo/model.onnx", data="/data/cifar10", out="runs/demo/eval")
"""

from __future__ import annotations

from dataclasses import dataclass

from cifarkit.errors import CifarkitError
from cifarkit.infer.config import DEFAULT_BATCH_SIZE, DEFAULT_LOAD_TIMEOUT_S, LOAD_TIMEOUT_HELP, check_load_timeout
from cifarkit.stage import REQUIRED, argument, option

SPLITS = ("test", "train")
DEFAULT_TOP_K = 5
CALIBRATION_BINS = 15  # equal-width confidence bins for ECE, as in Guo et al. 2017 ("On Calibration of ...")
FAILURES_KEPT = 100  # failure messages kept in the report (all are counted, and the reporter hears each)
OUT_FILES = ("report.json", "predictions.csv", "confusion.png", "reliability.png", "mistakes.png")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: `model` (and `model_b` beside it) on the labelled images of `data`; with `out`, the files
    of OUT_FILES written there. Each option's flag is cifar-eval's."""

    model: str = argument(metavar="MODEL", help="model.onnx (or a folder holding one), model.pt or checkpoint.pt.")
    data: str = option(
        REQUIRED,
        "--data",
        help="Labelled images: an ImageFolder root (train/ and test/), a folder of class sub-folders, a "
        "cifar-10-batches-py folder, 'torchvision' (downloads CIFAR-10) or 'sample' (the bundled sample).",
    )
    model_b: str | None = argument(None, metavar="MODEL_B", help="A second model, evaluated on the same images.")
    split: str | None = option(  # None: test (and no warning where the data has no splits)
        None, "--split", help="test or train (default test); not for a folder of class folders."
    )
    out: str | None = option(  # None: print only
        None, "--out", "-o", help="Also write report.json, predictions.csv and three PNGs to this folder."
    )
    top_k: int | None = option(  # None: 5, or fewer when the model has fewer classes
        None, "--top-k", "-k", help=f"Top-k accuracy (default {DEFAULT_TOP_K}, or the model's classes if fewer)."
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, "--batch-size", help="Images per model call.")
    threads: int | None = option(  # decoding threads; None: cores + 1
        None, "--threads", help="Decoding threads; 0: the main thread. Default: cores + 1."
    )
    skip_unknown: bool = option(False, "--skip-unknown", help="Leave out class folders the model does not know.")
    load_timeout: float = option(DEFAULT_LOAD_TIMEOUT_S, "--load-timeout", help=LOAD_TIMEOUT_HELP)  # seconds
    # Library-only settings:
    data_dir: str | None = None  # downloads and the extracted sample; None: $CIFARKIT_CACHE or ~/.cache/cifarkit
    bins: int = CALIBRATION_BINS  # calibration bins
    mistakes: int = 24  # most confident mistakes of the first model kept, with their pixels, for a picture

    @property
    def split_or_default(self) -> str:
        return self.split or "test"

    def validate(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise CifarkitError(f"--split must be test or train, got {self.split!r}")
        for name, value in (("--top-k", self.top_k), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise CifarkitError(f"{name} must be at least 1, got {value}")
        check_load_timeout(self.load_timeout)
        if self.threads is not None and self.threads < 0:
            raise CifarkitError(f"--threads must be 0 or more, got {self.threads}")
        if self.bins < 1 or self.mistakes < 0:
            raise CifarkitError("calibration bins must be at least 1 and kept mistakes 0 or more")
        if self.out is not None:
            import os

            if os.path.exists(self.out) and not os.path.isdir(self.out):
                raise CifarkitError(f"--out {self.out} is a file, expected a folder")
