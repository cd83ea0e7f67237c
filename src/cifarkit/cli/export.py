"""`cifar-export`: checkpoint -> verified model.onnx, model.pt and model.json.

cifar-export runs/blog/checkpoint.pt --format all --out runs/blog

Options come from cifarkit.export.config.ExportConfig; a missing checkpoint or a bad option is answered before
torch is imported.
"""

from __future__ import annotations

import sys

from cifarkit.cli import EXIT_OK, console, guarded
from cifarkit.cli.shell import Command, Debug
from cifarkit.export.config import ExportConfig


def run(cfg: ExportConfig, opts: Debug) -> int:
    from cifarkit.export.run import export

    result = guarded(lambda: export(cfg), debug=opts.debug)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for check in result.checks:
        print(
            f"verified {check.fmt:<11} on {check.images} images at batch sizes "
            f"{', '.join(map(str, check.batch_sizes))}: max |dlogit| {check.max_abs_diff:.2e}, "
            f"same classes: {'yes' if check.same_classes else 'NO'}"
        )
    for fmt, path in result.paths.items():
        print(f"wrote {path}  ({path.stat().st_size / 1024:,.0f} KiB, {fmt})")
    acc = result.meta.test_accuracy
    acc_text = f", test accuracy {100 * acc:.2f} %" if acc is not None else ""
    print(f"model {result.meta.model_name}: {len(result.meta.class_names)} classes{acc_text}")
    return EXIT_OK


COMMAND = Command(
    "cifar-export",
    ExportConfig,
    run,
    help="Export a checkpoint to ONNX and TorchScript; each artifact is compared with the eager model at batch "
    "sizes 1, 2, 7 and 64 (max |dlogit| <= 1e-4, identical classes) before anything is written.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
