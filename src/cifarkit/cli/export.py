"""`cifar-export`: checkpoint -> verified model.onnx, model.pt and model.json.

cifar-export runs/blog/checkpoint.pt --format all --out runs/blog
"""

from __future__ import annotations

from pathlib import Path

import typer

from cifarkit.cli import console, guarded, make_app

app = make_app("Export a checkpoint to ONNX and TorchScript, verified against the eager model before writing.")


@app.command()
def main(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt written by cifar-train."),
    format: str = typer.Option("all", "--format", "-f", help="onnx, torchscript or all."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: the checkpoint's folder)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    data: str = typer.Option(
        None,
        "--data",
        help="Verify on real test images from this source (an ImageFolder root or cifar-10-batches-py) "
        "instead of a fixed random batch.",
    ),
    data_dir: str = typer.Option(None, "--data-dir", help="Decoded-image cache folder."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Export; each artifact is compared with the eager model at batch sizes 1, 2, 7 and 64 (max |dlogit|
    <= 1e-4, identical classes) before anything is written."""

    def run():
        from cifarkit.errors import CifarkitError
        from cifarkit.export import FORMATS, export

        formats = FORMATS if format == "all" else (format,)
        if format != "all" and format not in FORMATS:
            raise CifarkitError(f"--format must be onnx, torchscript or all, got {format!r}")
        images = None
        if data:
            from cifarkit.data import load_data

            images = load_data(data, data_dir).test_x
        return export(
            checkpoint, out if out is not None else checkpoint.parent, formats=formats, opset=opset, images=images
        )

    result = guarded(run, debug=debug)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for check in result.checks:
        typer.echo(
            f"verified {check.fmt:<11} on {check.images} images at batch sizes "
            f"{', '.join(map(str, check.batch_sizes))}: max |dlogit| {check.max_abs_diff:.2e}, "
            f"same classes: {'yes' if check.same_classes else 'NO'}"
        )
    for fmt, path in result.paths.items():
        size = path.stat().st_size
        typer.echo(f"wrote {path}  ({size / 1024:,.0f} KiB, {fmt})")
    acc = result.meta.test_accuracy
    acc_text = f", test accuracy {100 * acc:.2f} %" if acc is not None else ""
    typer.echo(f"model {result.meta.model_name}: {len(result.meta.class_names)} classes{acc_text}")


def run() -> None:
    """The console script's entry point: the app under cifarkit's signal rules (exit 130 / 143)."""
    console(app)


if __name__ == "__main__":
    run()
