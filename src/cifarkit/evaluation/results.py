"""The evaluation's typed results: per model, the comparison of two, and the whole report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifarkit.evaluation.config import EvalConfig
from cifarkit.evaluation.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE_LEVEL, ClassScores, ConfusedPair
from cifarkit.evaluation.sources import LabelledImages
from cifarkit.spec import ArtifactMeta

# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationBin:
    lower: float  # confidence range (lower, upper]
    upper: float
    count: int  # images whose confidence falls here
    confidence: float | None  # their mean confidence (None for an empty bin)
    accuracy: float | None  # the fraction of them predicted right


@dataclass(frozen=True)
class Calibration:
    ece: float  # expected calibration error, a fraction (15 equal-width bins by default)
    nll: float  # mean -ln p(true class), nats
    brier: float  # mean multi-class Brier score, in [0, 2]
    bins: tuple[CalibrationBin, ...]


@dataclass(frozen=True)
class Mistake:
    """One of the most confident mistakes of the first model, with the pixels it saw."""

    source: str
    true: str
    predicted: str
    probability: float  # of `predicted`
    pixels: np.ndarray = field(repr=False)  # uint8 [H, W, 3]
    predicted_b: str | None = None  # the second model's answer, when there is one
    probability_b: float | None = None


@dataclass(frozen=True)
class ModelReport:
    path: str
    kind: str  # "onnx" | "torchscript" | "checkpoint"
    meta: ArtifactMeta
    images: int  # images evaluated
    correct: int
    top1: float  # fraction
    top1_interval: tuple[float, float]  # 95 % percentile bootstrap
    top_k: int  # k of the top-k figures
    topk: float
    topk_interval: tuple[float, float]
    per_class: tuple[ClassScores, ...]  # every class of the model, in its order
    macro: tuple[float, float, float]  # (precision, recall, F1) over the classes with images
    confusion: np.ndarray = field(repr=False)  # int64 [C, C], rows true, columns predicted
    confused: tuple[ConfusedPair, ...] = ()
    calibration: Calibration | None = None
    mistakes: tuple[Mistake, ...] = ()  # most confident first; only the first model keeps them

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "metadata": self.meta.to_dict(),
            "images": self.images,
            "correct": self.correct,
            "top1": self.top1,
            "top1_interval": list(self.top1_interval),
            "top_k": self.top_k,
            "topk": self.topk,
            "topk_interval": list(self.topk_interval),
            "macro": dict(zip(("precision", "recall", "f1"), self.macro, strict=True)),
            "per_class": [vars(s) | {"accuracy": s.recall} for s in self.per_class],
            "confusion": self.confusion.tolist(),
            "most_confused": [vars(p) for p in self.confused],
            "calibration": None
            if self.calibration is None
            else {
                "ece": self.calibration.ece,
                "nll": self.calibration.nll,
                "brier": self.calibration.brier,
                "bins": [vars(b) for b in self.calibration.bins],
            },
            "mistakes": [
                {k: v for k, v in vars(m).items() if k != "pixels" and (v is not None or not k.endswith("_b"))}
                for m in self.mistakes
            ],
        }


@dataclass(frozen=True)
class Comparison:
    """Two models on the same images; b and c are McNemar's discordant counts."""

    images: int
    agree: int  # images both models put in the same class
    max_abs_dprob: float  # largest |probability difference| over every image and class
    a_right_b_wrong: int  # b
    a_wrong_b_right: int  # c
    mcnemar_p: float  # McNemar's exact test: two-sided p-value that the two accuracies differ by chance

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {"agreement": self.agree / self.images if self.images else 0.0}


@dataclass(frozen=True)
class EvalReport:
    data: LabelledImages
    models: tuple[ModelReport, ...]  # one, or two (MODEL, MODEL_B)
    comparison: Comparison | None
    failed: int  # inputs that could not be read
    failures: tuple[str, ...]  # their messages (the first FAILURES_KEPT)
    seconds: float  # wall time of the streaming run (model loading and listing excluded)
    config: EvalConfig
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.models[0].images

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as JSON-ready plain data (no NaN: undefined ratios are null)."""
        cfg = self.config
        return {
            "schema": "cifarkit.evaluation/1",
            "data": self.data.to_dict(),
            "images": self.images,
            "failed": self.failed,
            "failures": list(self.failures),
            "models": [m.to_dict() for m in self.models],
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "settings": {
                "split": self.data.split,
                "top_k": self.models[0].top_k,
                "calibration_bins": cfg.bins,
                "interval": {"method": "percentile bootstrap", "confidence": CONFIDENCE_LEVEL},
                "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                "bootstrap_seed": BOOTSTRAP_SEED,
                "batch_size": cfg.batch_size,
            },
            "seconds": self.seconds,
            "images_per_second": self.images / self.seconds if self.seconds > 0 else None,
            "versions": self.versions,
        }
