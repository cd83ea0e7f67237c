"""How an evaluation runs: its options, with the CLI's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from cifarkit.errors import CifarkitError
from cifarkit.evaluation.metrics import CALIBRATION_BINS
from cifarkit.infer import DEFAULT_BATCH_SIZE

SPLITS = ("test", "train")
DEFAULT_TOP_K = 5
FAILURES_KEPT = 100  # failure messages kept in the report (all are counted, and the hook sees each)


@dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs. The CLI's defaults are these."""

    split: str = "test"  # "test" | "train": the split of an ImageFolder root, batches-py folder or torchvision
    top_k: int = DEFAULT_TOP_K  # top-k accuracy (clamped to the model's class count)
    batch_size: int = DEFAULT_BATCH_SIZE  # images per model call and per decoding task
    threads: int | None = None  # decoding threads; None: cores + 1 (files.default_threads), 0: the calling thread
    skip_unknown: bool = False  # leave out class folders the model does not know (an error otherwise)
    data_dir: str | None = None  # downloads and the extracted sample; None: $CIFARKIT_CACHE or ~/.cache/cifarkit
    bins: int = CALIBRATION_BINS  # calibration bins
    mistakes: int = 24  # most confident mistakes of the first model kept, with their pixels, for a picture

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise CifarkitError(f"--split must be test or train, got {self.split!r}")
        for name, value, least in (("--top-k", self.top_k, 1), ("--batch-size", self.batch_size, 1)):
            if value < least:
                raise CifarkitError(f"{name} must be at least {least}, got {value}")
        if self.threads is not None and self.threads < 0:
            raise CifarkitError(f"--threads must be 0 or more, got {self.threads}")
        if self.bins < 1 or self.mistakes < 0:
            raise CifarkitError("calibration bins must be at least 1 and kept mistakes 0 or more")
