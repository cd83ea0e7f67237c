"""`cifar-eval`: how good is a model on labelled images, where does it fail, and do two models differ?

cifar-eval runs/demo/model.onnx --data $CIFARKIT_DATA --out runs/demo/eval
cifar-eval runs/demo/model.onnx runs/demo/checkpoint.pt --data $CIFARKIT_DATA    # artifact vs checkpoint

Prints top-1 and top-k accuracy with 95 % bootstrap intervals, the per-class table (accuracy, precision, F1),
the most-confused pairs and calibration (ECE, NLL, Brier); with MODEL_B both side by side, their agreement and
McNemar's exact test. --out DIR adds report.json, predictions.csv, confusion.png, reliability.png and
mistakes.png, written into a temporary folder beside DIR and moved into place at the end. Exit status: 0 all
images evaluated, 1 some could not be read (each named on stderr), 2 usage error (bad option, model or data;
nothing written), 130 interrupted, 143 terminated. A model.onnx is run without importing torch.
"""

from __future__ import annotations

import os
import sys

# As in cifar-infer: numpy's OpenBLAS would start a spinning thread per core for matrix products this command
# never does (~0.06 s of CPU per start on 2 cores). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.cli import console, inputs_status, write_out  # noqa: E402
from cifarkit.cli.progress import run_reported  # noqa: E402
from cifarkit.cli.shell import Command, Progress  # noqa: E402
from cifarkit.evaluation.config import OUT_FILES, EvalConfig  # noqa: E402


def run(cfg: EvalConfig, opts: Progress) -> int:
    from cifarkit.evaluation.stage import evaluate
    from cifarkit.evaluation.text import report_text

    mode = "lines" if opts.progress == "none" else opts.progress  # the header is the report's, not progress
    report, _ = run_reported(evaluate, cfg, mode, debug=opts.debug, info=sys.stdout)
    write_out(report_text(report))
    if cfg.out is not None:
        write_out(f"\nwrote {cfg.out}/: {', '.join(OUT_FILES)}")
    return inputs_status(report.failed, report.data.count)


COMMAND = Command(
    "cifar-eval",
    EvalConfig,
    run,
    extras=Progress,
    help="Evaluate a model.onnx, model.pt or checkpoint.pt on labelled images (and compare it with MODEL_B). "
    "Exit status: 0 all evaluated, 1 some images could not be read (each named on stderr), 2 usage error.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
