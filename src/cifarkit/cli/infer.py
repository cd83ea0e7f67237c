"""`cifar-infer`: classify image files and folders with an exported model.onnx. No torch, starts in ~0.2 s.

cifar-infer photos/ cat.jpg --model artifacts/model.onnx --top-k 3 --format csv --output predictions.csv

Results stream out as they are computed (a readable table by default; csv, json or jsonl for scripts); an
image that cannot be read is named on stderr with the reason and the others carry on. Exit status:
0 every image classified, 1 some inputs failed, 2 usage error (bad option, missing or unusable model;
nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from cifarkit.cli import EXIT_FAILED, EXIT_OK, fail, guarded

# numpy's OpenBLAS starts a spinning thread per core as numpy is imported: ~0.06 s of CPU per start on 2 cores
# (measured: `import numpy` 0.145 s CPU, 0.081 s with one thread), taken from decoding on a busy machine, for
# matrix products this command never does (onnxruntime has its own kernels). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.cli.writers import FORMATS, Writer  # noqa: E402
from cifarkit.errors import CifarkitError  # noqa: E402
from cifarkit.infer import DEFAULT_BATCH_SIZE, Classifier, Failure, iter_image_files  # noqa: E402

MODEL_ENV = "CIFARKIT_MODEL"  # where the command looks for a model when --model is not given
DEFAULT_MODEL = "model.onnx"  # ... and then in the current folder

DESCRIPTION = (
    "Classify image files and folders (any size, JPEG/PNG/BMP/GIF/WebP/TIFF) with an exported model.onnx. "
    "Exit status: 0 all classified, 1 some inputs failed (each named on stderr), 2 usage error."
)
PROGRESS = ("auto", "bar", "none")
BAR_AFTER_S = 1.0  # --progress auto shows a bar only once a run has lasted this long: short runs stay quiet


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other usage error here
        fail(f"{message} (see cifar-infer --help)")


def parser() -> argparse.ArgumentParser:
    # argparse, not typer, for this one command: typer 0.29 imports and runs pydantic validators, measured
    # at ~0.12 s of a ~0.31 s one-image run; argparse costs ~5 ms. cifar-train and cifar-export keep typer.
    p = _Parser(prog="cifar-infer", description=DESCRIPTION)
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="Image files and folders (folders are walked recursively, sorted)."
    )
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"Exported model.onnx, or a folder holding one. Default: ${MODEL_ENV}, else ./model.onnx.",
    )
    p.add_argument("-k", "--top-k", type=int, default=1, help="Show the K most likely classes for each image.")
    p.add_argument(
        "-f",
        "--format",
        dest="fmt",
        default="table",
        help="table (readable, the default), csv, json or jsonl.",
    )
    p.add_argument("-o", "--output", default=None, help="Write results to FILE (atomically) instead of stdout.")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"Images per model call (default {DEFAULT_BATCH_SIZE}).",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="Decoding threads; 0 decodes in the main thread. Default: cores + 1."
    )
    p.add_argument(
        "--progress",
        default="auto",
        help="auto (a bar on stderr for runs over 1 s on a terminal), bar or none.",
    )
    p.add_argument("--debug", action="store_true", help="Show tracebacks and library warnings.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Classify images; print path, label and confidence for each. Returns the exit status."""
    args = parser().parse_args(argv)  # a usage error prints usage and exits 2
    paths, model, top_k, fmt, output = args.paths, args.model, args.top_k, args.fmt, args.output
    batch_size, threads, progress, debug = args.batch_size, args.threads, args.progress, args.debug
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if progress not in PROGRESS:
        fail(f"--progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if threads is not None and threads < 0:
        fail(f"--threads must be 0 or more, got {threads}")
    if top_k < 1:
        fail(f"--top-k must be at least 1, got {top_k}")
    if output is not None:
        _check_output(output)
    if not debug:
        # Pillow warns about odd EXIF blocks, big images (refused anyway, with our own message) and the like;
        # one line per failed file is the CLI's whole stderr contract.
        import warnings

        warnings.simplefilter("ignore")

    clf = guarded(lambda: Classifier.from_file(resolve_model_path(model)), debug=debug)
    if top_k > len(clf.labels):
        fail(f"--top-k {top_k} is more than the model's {len(clf.labels)} classes")

    def run() -> Stats:
        kwargs = dict(fmt=fmt, top_k=top_k, batch_size=batch_size, threads=threads, progress=progress)
        if output:
            return classify_to_file(clf, paths, output, **kwargs)
        return classify_to_stdout(clf, paths, **kwargs)

    stats = guarded(run, debug=debug)
    if stats.failed:
        total = stats.done + stats.failed
        print(f"{stats.failed} of {total} input(s) failed; see the lines above", file=sys.stderr)
    return EXIT_FAILED if stats.failed else EXIT_OK


def app(argv: list[str] | None = None) -> None:
    """The console script's entry point."""
    raise SystemExit(main(argv))


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


def _check_output(output: str) -> None:
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        fail(f"--output {output} is a folder, expected a file name")
    if not os.path.isdir(folder):
        fail(f"--output: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--output: cannot write to folder {folder} (permission denied)")


# ---------------------------------------------------------------------------------------------------------
# The run: classify, write rows as they come, report failures
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    done: int = 0  # images classified and written
    failed: int = 0  # inputs reported on stderr
    seconds: float = 0.0  # wall time of the classification, model loading excluded


def classify_to_file(clf: Classifier, paths: list[str], output: str, **kwargs: Any) -> Stats:
    """The rows stream into a temporary file beside OUTPUT, renamed over it at the end: an interrupted or
    crashed run leaves the old file (or none), never half of one."""
    from cifarkit.atomic import atomic_path

    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        return classify(clf, paths, f, to_terminal=False, **kwargs)


def classify_to_stdout(clf: Classifier, paths: list[str], **kwargs: Any) -> Stats:
    try:
        return classify(clf, paths, _StdoutProxy(), to_terminal=sys.stdout.isatty(), **kwargs)
    except BrokenPipeError:
        # `cifar-infer photos/ | head`: the reader is gone. Stop quietly; point stdout at /dev/null so that
        # the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_FAILED) from None


def classify(
    clf: Classifier,
    paths: list[str],
    f: IO[str] | _StdoutProxy,
    *,
    fmt: str,
    top_k: int,
    batch_size: int,
    threads: int | None,
    progress: str,
    to_terminal: bool,
) -> Stats:
    """Classify every image under `paths` and write a row for each as it comes; failures go to stderr."""
    writer = Writer(f, fmt, clf.labels, top_k)
    bar = _Bar(progress, stdout_is_terminal=to_terminal)
    stats = Stats()
    t0 = time.perf_counter()
    writer.start()
    try:
        for r in clf.predict_paths(iter_image_files(paths), top_k=top_k, batch_size=batch_size, threads=threads):
            if isinstance(r, Failure):
                stats.failed += 1
                bar.say(f"error: {r.message}")
            else:
                stats.done += 1
                writer.row(r)
                if stats.done % batch_size == 0:
                    f.flush()  # a reader downstream of a pipe sees each batch as it is done
            bar.update(stats)
        writer.end()
        f.flush()
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    bar.summary(stats)
    return stats


class _StdoutProxy:
    """sys.stdout looked up on every write: a progress bar (or a test runner) may swap it during the run."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except UnicodeEncodeError:  # a file name that is not valid UTF-8 (or not in the terminal's encoding)
            enc = sys.stdout.encoding or "utf-8"
            return sys.stdout.write(text.encode(enc, "backslashreplace").decode(enc))

    def flush(self) -> None:
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------
# Progress on stderr
# ---------------------------------------------------------------------------------------------------------


class _Bar:
    """A rich progress line on stderr (count, images/s, elapsed; the total is unknown because folders are
    walked lazily). rich is imported only when the bar starts, keeping it out of short runs' start-up."""

    def __init__(self, mode: str, *, stdout_is_terminal: bool) -> None:
        # With the rows going to the same terminal the table is its own progress; a bar would fight it.
        self.enabled = mode == "bar" or (mode == "auto" and sys.stderr.isatty() and not stdout_is_terminal)
        self.wait = 0.0 if mode == "bar" else BAR_AFTER_S
        self.redirect = stdout_is_terminal
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.progress: Any = None
        self.task: Any = None

    def update(self, stats: Stats) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1:  # ~10 redraws a second: rich's update costs ~20 us, rows ~2 us
            return
        self.last = now
        if self.progress is None:
            if now - self.t0 < self.wait:
                return
            self._start()
        ips = stats.done / max(now - self.t0, 1e-9)
        self.progress.update(self.task, completed=stats.done, failed=stats.failed, ips=f"{ips:,.0f}")

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.completed:,} images classified, {task.fields[failed]} failed"),
            TextColumn("{task.fields[ips]} images/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
            redirect_stdout=self.redirect,
            redirect_stderr=False,
        )
        self.task = self.progress.add_task("classify", total=None, failed=0, ips="-")
        self.progress.start()

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def summary(self, stats: Stats) -> None:
        if self.progress is not None:  # only after a run long enough to have shown a bar
            ips = stats.done / max(stats.seconds, 1e-9)
            print(
                f"classified {stats.done:,} images in {stats.seconds:.1f} s ({ips:,.0f} images/s)",
                file=sys.stderr,
            )


if __name__ == "__main__":
    app()
