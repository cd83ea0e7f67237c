"""Evaluation stage: EvalConfig -> evaluate() -> EvalReport, and with `out` the report's files: report.json,
predictions.csv (a row per image, written as the images stream), confusion.png, reliability.png and
mistakes.png, staged beside `out` and moved into place at the end.

    from cifarkit.evaluation import EvalConfig, evaluate
    report = evaluate(EvalConfig(model="runs/demo/model.onnx", data="/data/cifar10", out="runs/demo/eval"))
    report.models[0].top1
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

from cifarkit.atomic import staged_folder
from cifarkit.escape import escape_name
from cifarkit.evaluation.config import OUT_FILES, EvalConfig
from cifarkit.evaluation.results import EvalReport
from cifarkit.evaluation.run import BatchResult, Evaluation
from cifarkit.evaluation.text import header_lines
from cifarkit.stage import Reporter, Silent


def evaluate(cfg: EvalConfig, reporter: Reporter | None = None) -> EvalReport:
    """Evaluate `cfg.model` (and compare it with `cfg.model_b`) on the labelled images of `cfg.data`. The
    reporter hears what is evaluated (info notes), what was left out of the data (warnings), each image that
    could not be read (errors) and the progress. Raises CifarkitError, before any image is read, for a bad
    model, data source or option; with `out`, nothing is written unless the whole evaluation succeeds."""
    rep = reporter or Silent()
    ev = Evaluation(cfg)
    if cfg.split is not None and ev.data.split is None:
        rep.note(f"--split {cfg.split} is ignored: {ev.data.location} is a folder of class folders", "warning")
    for line in header_lines(ev.models, ev.data):
        rep.note(line)
    for note in ev.data.notes:
        rep.note(note, "warning")
    with staged_folder(cfg.out, replace=OUT_FILES) if cfg.out else contextlib.nullcontext() as stage:
        report = _run(ev, stage, rep)
        if stage is not None:
            from cifarkit.evaluation.figures import write_report_files

            write_report_files(report, stage)
    return report


def _run(ev: Evaluation, stage: Path | None, rep: Reporter) -> EvalReport:
    """Stream every image through the models; write predictions.csv (into `stage`) as the rows come."""
    names = [escape_name(c) for c in ev.class_names]
    done = failed = 0
    rep.phase("images evaluated", ev.data.count)
    t0 = time.perf_counter()
    f = open(stage / "predictions.csv", "w", encoding="utf-8", newline="") if stage else None  # noqa: SIM115
    rows = csv.writer(f, lineterminator="\n") if f else None
    if rows:
        extra = ["predicted_b", "probability_b"] if len(ev.models) > 1 else []
        rows.writerow(["path", "true", "predicted", "probability", *extra])

    def on_batch(b: BatchResult) -> None:
        nonlocal done, failed
        for failure in b.failures:
            rep.note(failure.message, "error")
        if rows:
            preds, probs, true = [p.tolist() for p in b.predicted], [q.tolist() for q in b.probability], b.true.tolist()
            for j, src in enumerate(b.sources):
                row = [escape_name(src), names[true[j]]]
                for p, q in zip(preds, probs, strict=True):
                    row += [names[p[j]], f"{q[j]:.6f}"]
                rows.writerow(row)
        done, failed = done + len(b.sources), failed + len(b.failures)
        rep.progress(done, failed=failed, images_per_s=done / max(time.perf_counter() - t0, 1e-9))

    try:
        return ev.run(on_batch)
    finally:
        if f:
            f.close()
