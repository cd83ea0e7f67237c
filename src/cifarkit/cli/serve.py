"""`cifar-serve`: an exported model.onnx behind HTTP, on Ray Serve, with requests batched across clients.

cifar-serve runs/blog/model.onnx --port 8000 --replicas 1 --max-batch 64 --batch-wait-ms 5

Prints `ready: URL ...` once the service answers, then serves until Ctrl-C or SIGTERM, which shut Ray Serve down
and stop the local Ray it started (nothing left running). Endpoints: POST /v1/classify, POST /v1/classify-batch,
GET /v1/model, GET /healthz (docs/serving.md). Exit status: 2 usage error (bad option or model, port in use, Ray
Serve not installed, cluster unreachable; one line on stderr), 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import dataclasses
import os
import sys

# numpy's OpenBLAS starts a spinning thread per core as numpy is imported, for matrix products nobody here does
# (cifar-infer measured ~0.06 s of CPU per start on 2 cores). A local Ray and its replicas inherit the setting.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.cli import EXIT_OK, console, guarded  # noqa: E402
from cifarkit.cli.shell import Command, Debug  # noqa: E402
from cifarkit.serve.config import ServeConfig  # noqa: E402


def run(cfg: ServeConfig, opts: Debug) -> int:
    from cifarkit.cli.progress import Lines
    from cifarkit.serve.processes import become_subreaper
    from cifarkit.serve.run import serve

    become_subreaper()  # workers orphaned by a raylet that died first come back here to be ended (processes.py)
    reporter = Lines(sys.stdout)  # "starting a local Ray", "deploying ...", then the "ready: URL" line
    guarded(lambda: serve(dataclasses.replace(cfg, quiet=not opts.debug), reporter), debug=opts.debug)
    return EXIT_OK


COMMAND = Command(
    "cifar-serve",
    ServeConfig,
    run,
    extras=Debug,
    help="Serve an exported model.onnx over HTTP on Ray Serve (POST /v1/classify, POST /v1/classify-batch, "
    "GET /v1/model, GET /healthz), batching requests across clients. Prints 'ready: URL' once it answers; Ctrl-C "
    "or SIGTERM shut it down cleanly. Needs pip install 'cifarkit[serve]'.",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
