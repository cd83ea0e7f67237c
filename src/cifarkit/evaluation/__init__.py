"""Evaluation stage: how good is a model on labelled images, where does it fail, and do two models differ?

Any artifact (model.onnx in onnxruntime, a TorchScript model.pt, or a checkpoint.pt run eagerly) on labelled
images (an ImageFolder root's test or train split, a folder of class sub-folders, a cifar-10-batches-py folder,
torchvision's CIFAR-10, the bundled sample). The ONNX path never imports torch. Images stream through the
ordered decode window that cifar-infer uses, and every figure is accumulated batch by batch (a confusion
matrix, counts, sums, calibration bins): decoded images are held a few batches at a time, whatever the number
of images (a folder source lists its paths first; an array source is its arrays).

    from cifarkit.evaluation import evaluate_model
    report = evaluate_model("runs/demo/model.onnx", "/data/cifar10")          # its test split
    a = report.models[0]
    a.top1, a.top1_interval, a.calibration.ece, a.per_class[3].f1
    report = evaluate_model("model.onnx", "/data/cifar10", model_b="checkpoint.pt")
    report.comparison.agree, report.comparison.mcnemar_p

The metric functions (accuracy, confusion_matrix, per_class_scores, calibration_counts, ...) are pure numpy and
can be used alone.
"""

from cifarkit.evaluation.config import DEFAULT_TOP_K, SPLITS, EvalConfig
from cifarkit.evaluation.metrics import (
    CALIBRATION_BINS,
    ClassScores,
    ConfusedPair,
    accuracy,
    bootstrap_interval,
    brier_score,
    calibration_counts,
    confusion_matrix,
    expected_calibration_error,
    macro_average,
    mcnemar_exact,
    most_confused,
    negative_log_likelihood,
    per_class_scores,
    top_k_hits,
)
from cifarkit.evaluation.results import Calibration, CalibrationBin, Comparison, EvalReport, Mistake, ModelReport
from cifarkit.evaluation.run import BatchResult, Evaluation, evaluate_model
from cifarkit.evaluation.sources import LabelledImages, LoadedModel, column_order, model_kind, open_labelled, open_model

__all__ = [
    "CALIBRATION_BINS",
    "DEFAULT_TOP_K",
    "SPLITS",
    "BatchResult",
    "Calibration",
    "CalibrationBin",
    "ClassScores",
    "Comparison",
    "ConfusedPair",
    "EvalConfig",
    "EvalReport",
    "Evaluation",
    "LabelledImages",
    "LoadedModel",
    "Mistake",
    "ModelReport",
    "accuracy",
    "bootstrap_interval",
    "brier_score",
    "calibration_counts",
    "column_order",
    "confusion_matrix",
    "evaluate_model",
    "expected_calibration_error",
    "macro_average",
    "mcnemar_exact",
    "model_kind",
    "most_confused",
    "negative_log_likelihood",
    "open_labelled",
    "open_model",
    "per_class_scores",
    "top_k_hits",
]
