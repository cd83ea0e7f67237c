"""`cifar-export`: checkpoint -> verified model.onnx, model.pt and model.json; their compact variants; a Triton
model repository.

cifar-export runs/blog/checkpoint.pt --format all --out runs/blog
cifar-export runs/air/checkpoint.pt --quantize int8 --data $CIFARKIT_DATA     # runs/air/int8/model.onnx

Options come from cifarkit.export.config.ExportConfig; a missing checkpoint or a bad option is answered before
torch is imported. Exit status: 0 written, 1 a variant lost more than --max-drop accuracy points (nothing
written), 2 bad input (nothing written).
"""

from __future__ import annotations

import sys
from typing import Any

from cifarkit.cli import EXIT_OK, console
from cifarkit.cli.progress import run_reported
from cifarkit.cli.shell import Command, Progress
from cifarkit.export.config import ExportConfig


def run(cfg: ExportConfig, opts: Progress) -> int:
    from cifarkit.export.run import export

    result, _ = run_reported(export, cfg, opts.progress, debug=opts.debug, info=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for check in result.checks:
        print(
            f"verified {check.fmt:<11} on {check.images} images at batch sizes "
            f"{', '.join(map(str, check.batch_sizes))}: max |dlogit| {check.max_abs_diff:.2e}, "
            f"same classes: {'yes' if check.same_classes else 'NO'}"
        )
    acc = result.accuracy
    if acc is not None:
        print(
            f"verified {cfg.variant_name} against fp32 on {acc.images:,} labelled test images: "
            f"{100 * acc.artifact:.2f} % against {100 * acc.reference:.2f} % ({-acc.drop_points:+.2f} points, "
            f"--max-drop {cfg.max_drop:g}), the same class for {100 * acc.agree:.2f} %"
        )
    for fmt, path in result.paths.items():
        print(f"wrote {path}  ({path.stat().st_size / 1024:,.0f} KiB, {fmt})")
    test_acc = result.meta.test_accuracy
    acc_text = f", test accuracy {100 * test_acc:.2f} % (recorded in training)" if test_acc is not None else ""
    print(f"model {result.meta.model_name}: {len(result.meta.class_names)} classes{acc_text}")
    print_table(result)
    return EXIT_OK


def print_table(result: Any) -> None:
    """artifact | size | accuracy | images/s | vs fp32; and a plain sentence when a variant is slower."""
    if not result.table:
        return
    print(f"\n{'artifact':<22} {'size':>10} {'accuracy':>9} {'images/s':>9} {'vs fp32':>8}  file")
    for row in result.table:
        acc = f"{100 * row.accuracy:.2f} %" if row.accuracy is not None else "-"
        speed = f"{row.images_per_s:,.0f}" if row.images_per_s is not None else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        where = str(row.path) if row.path is not None else "(built to compare with)"
        print(f"{row.artifact:<22} {_size(row.size):>10} {acc:>9} {speed:>9} {ratio:>8}  {where}")
    n = result.verified_on
    print(f"accuracy on {n:,} test images; images/s of the model alone at batch 256 on this machine")
    for row in result.table[1:]:
        if row.ratio is not None and row.ratio < 1 and "onnx" in row.artifact:
            print(f"note: {row.artifact} is slower than fp32 on this machine ({row.ratio:.2f}x); written as asked")


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


COMMAND = Command(
    "cifar-export",
    ExportConfig,
    run,
    extras=Progress,
    help="Export a checkpoint to ONNX and TorchScript (or a compact variant of the ONNX model, or a Triton "
    "repository). An fp32 artifact is compared with the eager model at batch sizes 1, 2, 7 and 64 (max |dlogit| "
    "<= 1e-4, identical classes), a variant with the fp32 model on labelled test images (--max-drop), before "
    "anything is written; a table of sizes, accuracy and images/s ends the export.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
