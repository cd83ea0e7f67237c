"""`cifar-infer`: classify image files and folders with an exported model.onnx. No torch, starts in ~0.2 s.

cifar-infer photos/ cat.jpg --model artifacts/model.onnx --top-k 3 --format csv --output predictions.csv

Results stream out as they are computed (a readable table by default; csv, json or jsonl for scripts); an
image that cannot be read is named on stderr with the reason and the others carry on. Exit status:
0 every image classified, 1 some inputs failed, 2 usage error (bad option, missing or unusable model;
nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
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

from cifarkit.infer import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    MODEL_ENV,
    Classifier,
    Failure,
    Prediction,
    iter_image_files,
    resolve_model_path,
)

DESCRIPTION = (
    "Classify image files and folders (any size, JPEG/PNG/BMP/GIF/WebP/TIFF) with an exported model.onnx. "
    "Exit status: 0 all classified, 1 some inputs failed (each named on stderr), 2 usage error."
)
FORMATS = ("table", "csv", "json", "jsonl")
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
    run = _Run(clf, paths, fmt=fmt, top_k=top_k, batch_size=batch_size, threads=threads, progress=progress)
    stats = guarded(lambda: run.to_file(output) if output else run.to_stdout(), debug=debug)
    if stats.failed:
        total = stats.done + stats.failed
        print(f"{stats.failed} of {total} input(s) failed; see the lines above", file=sys.stderr)
    return EXIT_FAILED if stats.failed else EXIT_OK


def app(argv: list[str] | None = None) -> None:
    """The console script's entry point."""
    raise SystemExit(main(argv))


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


class _Run:
    def __init__(
        self,
        clf: Classifier,
        paths: list[str],
        *,
        fmt: str,
        top_k: int,
        batch_size: int,
        threads: int | None,
        progress: str,
    ) -> None:
        self.clf, self.paths, self.fmt, self.top_k = clf, paths, fmt, top_k
        self.batch_size, self.threads, self.progress = batch_size, threads, progress

    def to_file(self, output: str) -> Stats:
        from cifarkit.atomic import atomic_path

        # The rows stream into a temporary file beside OUTPUT, renamed over it at the end: an interrupted
        # or crashed run leaves the old file (or none), never half of one.
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            stats = self._stream(f, to_terminal=False)
        return stats

    def to_stdout(self) -> Stats:
        out = _StdoutProxy()
        try:
            return self._stream(out, to_terminal=sys.stdout.isatty())
        except BrokenPipeError:
            # `cifar-infer photos/ | head`: the reader is gone. Stop quietly; point stdout at /dev/null so that
            # the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(EXIT_FAILED) from None

    def _stream(self, f: IO[str] | _StdoutProxy, *, to_terminal: bool) -> Stats:
        writer = _WRITERS[self.fmt](f, self.clf.labels, self.top_k)
        bar = _Bar(self.progress, stdout_is_terminal=to_terminal)
        stats = Stats()
        t0 = time.perf_counter()
        writer.start()
        try:
            results = self.clf.predict_paths(
                iter_image_files(self.paths), top_k=self.top_k, batch_size=self.batch_size, threads=self.threads
            )
            for r in results:
                if isinstance(r, Failure):
                    stats.failed += 1
                    bar.say(f"error: {r.message}")
                else:
                    stats.done += 1
                    writer.row(r)
                    if stats.done % self.batch_size == 0:
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
# Output formats
# ---------------------------------------------------------------------------------------------------------


class _TableWriter:
    """Aligned columns, path last: rows are printed as they come, so the widths must be known up front, and
    the label width is (from the model's class names) while the path width is not."""

    def __init__(self, f: Any, labels: tuple[str, ...], top_k: int) -> None:
        self.f, self.k = f, top_k
        self.width = max(5, *(len(label) for label in labels))

    def start(self) -> None:
        cells = [f"{'label' if i == 0 else f'#{i + 1}':<{self.width}}   prob" for i in range(self.k)]
        self.f.write("  ".join(cells) + "  path\n")

    def row(self, p: Prediction) -> None:
        cells = [f"{label:<{self.width}} {100 * prob:5.1f}%" for label, prob in p.top_k]
        self.f.write("  ".join(cells) + f"  {p.source}\n")

    def end(self) -> None: ...


class _CsvWriter:
    """path,label,index,probability then label_2,probability_2,... for --top-k > 1."""

    def __init__(self, f: Any, labels: tuple[str, ...], top_k: int) -> None:
        self.w = csv.writer(f, lineterminator="\n")
        self.k = top_k

    def start(self) -> None:
        extra = [c for i in range(2, self.k + 1) for c in (f"label_{i}", f"probability_{i}")]
        self.w.writerow(["path", "label", "index", "probability", *extra])

    def row(self, p: Prediction) -> None:
        extra = [v for label, prob in p.top_k[1:] for v in (label, f"{prob:.6f}")]
        self.w.writerow([p.source, p.label, p.index, f"{p.probability:.6f}", *extra])

    def end(self) -> None: ...


class _JsonlWriter:
    """One JSON object a line: {"path", "label", "index", "probability", "top_k": [{"label", "probability"}]}."""

    def __init__(self, f: Any, labels: tuple[str, ...], top_k: int) -> None:
        self.f = f

    def start(self) -> None: ...

    def row(self, p: Prediction) -> None:
        self.f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")

    def end(self) -> None: ...


class _JsonWriter(_JsonlWriter):
    """One JSON array of the jsonl objects, still written row by row."""

    def start(self) -> None:
        self.f.write("[")
        self.sep = "\n"

    def row(self, p: Prediction) -> None:
        self.f.write(self.sep + json.dumps(p.to_dict(), ensure_ascii=False))
        self.sep = ",\n"

    def end(self) -> None:
        self.f.write("\n]\n")


_WRITERS = {"table": _TableWriter, "csv": _CsvWriter, "json": _JsonWriter, "jsonl": _JsonlWriter}


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
