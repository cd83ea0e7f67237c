"""`cifar-infer`: classify image files and folders with an exported model.onnx. No torch; starts in ~0.2 s.

cifar-infer photos/ cat.jpg --model artifacts/model.onnx --top-k 3 --format csv --output predictions.csv

Results stream out as they are computed (a readable table by default; csv, json or jsonl for scripts; parquet
for datasets); an image that cannot be read is named on stderr with the reason and the others carry on. Exit
status: 0 every image classified, 1 some inputs failed, 2 usage error (bad option, missing or unusable model;
nothing written), 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# numpy's OpenBLAS starts a spinning thread per core as numpy is imported: ~0.06 s of CPU per start on 2 cores
# (measured: `import numpy` 0.145 s CPU, 0.081 s with one thread), taken from decoding on a busy machine, for
# matrix products this command never does (onnxruntime has its own kernels). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.cli import console, guarded, inputs_status, quiet_broken_pipe  # noqa: E402
from cifarkit.cli.progress import run_reported  # noqa: E402
from cifarkit.cli.shell import Command, Progress  # noqa: E402
from cifarkit.errors import CifarkitError  # noqa: E402
from cifarkit.infer.config import InferConfig  # noqa: E402

MODEL_ENV = "CIFARKIT_MODEL"  # where the command looks for a model when --model is not given
DEFAULT_MODEL = "model.onnx"  # ... and then in the current folder


def resolve_model_path(model: str | None) -> str:
    """The --model rule: the given path, else $CIFARKIT_MODEL, else model.onnx in the current folder."""
    if model:
        return model
    env = os.environ.get(MODEL_ENV)
    if env:
        return env
    if os.path.exists(DEFAULT_MODEL):
        return DEFAULT_MODEL
    raise CifarkitError(
        f"no model: pass --model MODEL.onnx, set ${MODEL_ENV}, or run in a folder holding {DEFAULT_MODEL} "
        "(make one with cifar-export CHECKPOINT --out FOLDER)"
    )


def prepare(values: dict[str, Any]) -> dict[str, Any]:
    if values.get("engine") == "http":  # the model is the server's (--url)
        return values
    return {**values, "model": resolve_model_path(values["model"])}


def run(cfg: InferConfig, opts: Progress) -> int:
    from cifarkit.infer.providers import CPU, choose_providers, quiet_native_logs
    from cifarkit.infer.run import infer

    if not opts.debug and guarded(lambda: choose_providers(cfg.device), debug=False) != [CPU]:
        quiet_native_logs()  # a GPU provider that failed to load logs several lines; one warning says it
    rows_on_terminal = cfg.output is None and sys.stdout is not None and sys.stdout.isatty()
    result, reporter = run_reported(
        lambda c, r: quiet_broken_pipe(lambda: infer(c, r)),
        cfg,
        opts.progress,
        debug=opts.debug,
        info=sys.stderr,
        rows_on_terminal=rows_on_terminal,
    )
    if getattr(reporter, "shown", False) or opts.progress == "lines":
        ips = result.done / max(result.seconds, 1e-9)
        print(f"classified {result.done:,} images in {result.seconds:.1f} s ({ips:,.0f} images/s)", file=sys.stderr)
    return inputs_status(result.failed, result.done + result.failed)


COMMAND = Command(
    "cifar-infer",
    InferConfig,
    run,
    extras=Progress,
    prepare=prepare,
    help="Classify image files and folders (any size, JPEG/PNG/BMP/GIF/WebP/TIFF) with an exported model.onnx. "
    "Exit status: 0 all classified, 1 some inputs failed (each named on stderr), 2 usage error.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
