"""Evaluation stage: EvalConfig -> evaluate(cfg, reporter) -> EvalReport. How good is a model on labelled images,
where does it fail, and do two models differ?

Any artifact (model.onnx in onnxruntime, a TorchScript model.pt, or a checkpoint.pt run eagerly) on labelled
images (an ImageFolder root's test or train split, a folder of class sub-folders, a cifar-10-batches-py folder,
torchvision's CIFAR-10, the bundled sample). The ONNX path never imports torch. Images stream through the
ordered decode window that cifar-infer uses, and every figure is accumulated batch by batch: decoded images are
held a few batches at a time, whatever the number of images.

    from cifarkit.evaluation import EvalConfig, evaluate
    report = evaluate(EvalConfig(model="runs/demo/model.onnx", data="/data/cifar10", out="runs/demo/eval"))
    a = report.models[0]
    a.top1, a.top1_interval, a.calibration.ece, a.per_class[3].f1
    report = evaluate(EvalConfig(model="model.onnx", model_b="checkpoint.pt", data="/data/cifar10"))
    report.comparison.agree, report.comparison.mcnemar_p

    config.py    EvalConfig and its checks (no numpy)
    metrics.py   the figures as pure numpy functions (accuracy, confusion, calibration, McNemar, ...)
    sources.py   models of three kinds behind one interface; labelled images from any source
    run.py       Evaluation: the models bound to the data, streamed, accumulated
    results.py   the typed report
    text.py      the report as cifar-eval prints it
    figures.py   report.json and the three pictures
    stage.py     evaluate(): the stage, with predictions.csv and the files of --out

Names are imported lazily: `import cifarkit.evaluation.config` loads no numpy.
"""

from __future__ import annotations

from cifarkit.stage import lazy_exports

_EXPORTS = {
    "EvalConfig": "config",
    "SPLITS": "config",
    "DEFAULT_TOP_K": "config",
    "CALIBRATION_BINS": "config",
    "OUT_FILES": "config",
    "evaluate": "stage",
    "Evaluation": "run",
    "BatchResult": "run",
    "EvalReport": "results",
    "ModelReport": "results",
    "Comparison": "results",
    "Calibration": "results",
    "CalibrationBin": "results",
    "Mistake": "results",
    "LabelledImages": "sources",
    "LoadedModel": "sources",
    "open_model": "sources",
    "open_labelled": "sources",
    "model_kind": "sources",
    "column_order": "sources",
    "report_text": "text",
    "header_lines": "text",
    "write_report_files": "figures",
    "ClassScores": "metrics",
    "ConfusedPair": "metrics",
    "accuracy": "metrics",
    "bootstrap_interval": "metrics",
    "brier_score": "metrics",
    "calibration_counts": "metrics",
    "confusion_matrix": "metrics",
    "expected_calibration_error": "metrics",
    "macro_average": "metrics",
    "mcnemar_exact": "metrics",
    "most_confused": "metrics",
    "negative_log_likelihood": "metrics",
    "per_class_scores": "metrics",
    "top_k_hits": "metrics",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
