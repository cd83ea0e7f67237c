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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from cifarkit.cli import EXIT_FAILED, EXIT_OK, console, fail, guarded

# numpy's OpenBLAS starts a spinning thread per core as numpy is imported: ~0.06 s of CPU per start on 2 cores
# (measured: `import numpy` 0.145 s CPU, 0.081 s with one thread), taken from decoding on a busy machine, for
# matrix products this command never does (onnxruntime has its own kernels). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.cli.progress import PROGRESS, Bar  # noqa: E402
from cifarkit.cli.writers import FORMATS, Writer  # noqa: E402
from cifarkit.errors import CifarkitError  # noqa: E402
from cifarkit.escape import escape_name  # noqa: E402
from cifarkit.files import MAX_THREADS  # noqa: E402
from cifarkit.infer import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, Classifier, Failure, Result  # noqa: E402
from cifarkit.providers import CPU, DEVICES, ProviderFallbackWarning, choose_providers, quiet_native_logs  # noqa: E402
from cifarkit.shards import InputPlan  # noqa: E402

MODEL_ENV = "CIFARKIT_MODEL"  # where the command looks for a model when --model is not given
DEFAULT_MODEL = "model.onnx"  # ... and then in the current folder

DESCRIPTION = (
    "Classify image files and folders (any size, JPEG/PNG/BMP/GIF/WebP/TIFF) with an exported model.onnx. "
    "Exit status: 0 all classified, 1 some inputs failed (each named on stderr), 2 usage error."
)
ENGINES = ("local", "ray")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other usage error here
        fail(f"{message} (see cifar-infer --help)")


def parser() -> argparse.ArgumentParser:
    # argparse, not typer, for this one command: typer 0.29 imports and runs pydantic validators, measured
    # at ~0.12 s of a ~0.31 s one-image run; argparse costs ~5 ms. cifar-train and cifar-export keep typer.
    p = _Parser(prog="cifar-infer", description=DESCRIPTION)
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="Image files and folders (folders are walked recursively, sorted), Parquet shards from cifar-pack "
        "(a .parquet file or a folder of them), or URIs pyarrow reads (s3://, gs://, hdfs://, file://).",
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
        help="table (readable, the default), csv, json, jsonl, or parquet (a folder of part files, --output "
        "FOLDER, with a row for every input, failed ones included).",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="Write results to FILE (atomically) instead of stdout; with --format parquet, a new FOLDER.",
    )
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
    p.add_argument(
        "--device",
        default="auto",
        help="Where onnxruntime runs the model: auto (TensorRT, then CUDA, then the CPU, as the installed "
        "onnxruntime offers; the CPU with the standard onnxruntime package), cpu, cuda or tensorrt "
        "(cuda and tensorrt need onnxruntime-gpu in place of onnxruntime).",
    )
    p.add_argument(
        "--engine",
        default="local",
        help="local (this process, the default) or ray (actors on a Ray cluster: pip install 'cifarkit[ray]').",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="With --engine ray: the cluster (HOST:PORT of `ray start --head`, ray://HOST:PORT, or auto). "
        "Default: $RAY_ADDRESS, else a cluster started on this machine, else a new local Ray.",
    )
    p.add_argument(
        "--ray-actors", type=int, default=None, help="With --engine ray: actors, 1 CPU each. Default: one per CPU."
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
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        fail(f"--batch-size must be 1 to {MAX_BATCH_SIZE}, got {batch_size}")
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        fail(f"--threads must be 0 to {MAX_THREADS}, got {threads}")
    if top_k < 1:
        fail(f"--top-k must be at least 1, got {top_k}")
    if args.device not in DEVICES:
        fail(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
    _check_engine(args)
    if fmt == "parquet":
        _check_output_folder(output)
    elif output is not None:
        _check_output(output, paths)
    if not debug:
        # Pillow warns about odd EXIF blocks, big images (refused anyway, with our own message) and the like;
        # one line per failed file is the CLI's whole stderr contract.
        import warnings

        warnings.simplefilter("ignore")

    clf = guarded(lambda: load_classifier(model, args.device, debug=debug), debug=debug)
    if top_k > len(clf.labels):
        fail(f"--top-k {top_k} is more than the model's {len(clf.labels)} classes")
    if output is not None and fmt != "parquet":
        _check_output(output, paths, clf.source)
    plan = guarded(lambda: InputPlan.resolve(paths), debug=debug)  # shards and URIs are checked here
    engine: Classifier | Any = clf
    if args.engine == "ray":
        engine = guarded(lambda: _ray_engine(clf, args.ray_address, args.ray_actors, debug=debug), debug=debug)

    def run() -> Stats:
        kwargs = dict(fmt=fmt, top_k=top_k, batch_size=batch_size, threads=threads, progress=progress)
        if fmt == "parquet":
            return classify_to_folder(engine, plan, output, **kwargs)
        if output:
            return classify_to_file(engine, plan, output, **kwargs)
        return classify_to_stdout(engine, plan, **kwargs)

    try:
        stats = guarded(run, debug=debug)
    finally:
        if engine is not clf:
            engine.close()
    if stats.failed:
        total = stats.done + stats.failed
        print(f"{stats.failed} of {total} input(s) failed; see the lines above", file=sys.stderr)
    return EXIT_FAILED if stats.failed else EXIT_OK


def app(argv: list[str] | None = None) -> None:
    """The console script's entry point, under cifarkit's signal rules (exit 130 / 143)."""
    console(lambda: sys.exit(main(argv)))


def load_classifier(model: str | None, device: str, *, debug: bool) -> Classifier:
    """The model on --device. A GPU provider that did not start under --device auto becomes one warning line
    on stderr (onnxruntime's own log lines about it are kept for --debug)."""
    import warnings

    if not debug and choose_providers(device) != [CPU]:  # the CPU path's logging stays as it was
        quiet_native_logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProviderFallbackWarning)
        clf = Classifier.from_file(resolve_model_path(model), device=device)
    for w in caught:
        if issubclass(w.category, ProviderFallbackWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:  # only recorded under --debug; show it as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return clf


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


def _check_output(output: str, inputs: list[str], model: str | None = None) -> None:
    """--output must name a file we may replace: not a folder, FIFO or device (a symlink is followed: its
    target file is replaced, the link stays), not one of the inputs or the model, in a writable folder."""
    from cifarkit.atomic import write_target
    from cifarkit.files import has_image_extension

    if os.path.isdir(output):
        fail(f"--output {output} is a folder, expected a file name")
    target = guarded(lambda: write_target(output, "--output"), debug=False)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        fail(f"--output: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--output: cannot write to folder {folder} (permission denied)")
    if not os.path.exists(target):
        return
    if model is not None and _same_file(target, model):
        fail(f"--output {output} is the model file; refusing to write over it")
    for path in inputs:
        inside = os.path.isdir(path) and _under(target, path) and has_image_extension(str(target))
        if inside or (os.path.isfile(path) and _same_file(target, path)):
            fail(f"--output {output} is one of the inputs ({path}); refusing to write over it")


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _under(path: str | os.PathLike[str], folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


# ---------------------------------------------------------------------------------------------------------
# The run: classify, write rows as they come, report failures
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    done: int = 0  # images classified and written
    failed: int = 0  # inputs reported on stderr
    seconds: float = 0.0  # wall time of the classification, model loading excluded


def classify_to_folder(clf: Classifier, paths: InputPlan, output: str, **kwargs: Any) -> Stats:
    """--format parquet: part files are written into a temporary folder beside OUTPUT, renamed to OUTPUT at
    the end: the folder appears complete, with a row for every input, or not at all."""
    from cifarkit.atomic import staged_folder
    from cifarkit.shards import PredictionParts

    with staged_folder(output, "--output") as tmp:
        if isinstance(clf, Classifier):
            return classify(clf, paths, PredictionParts(tmp), to_terminal=False, **kwargs)
        return classify_tables(clf, paths, PredictionParts(tmp), **kwargs)


def classify_to_file(clf: Classifier, paths: InputPlan, output: str, **kwargs: Any) -> Stats:
    """The rows stream into a temporary file beside OUTPUT, renamed over it at the end: an interrupted or
    crashed run leaves the old file (or none), never half of one."""
    from cifarkit.atomic import atomic_path

    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        return classify(clf, paths, f, to_terminal=False, **kwargs)


def classify_to_stdout(clf: Classifier, paths: InputPlan, **kwargs: Any) -> Stats:
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
    paths: InputPlan,
    f: IO[str] | _StdoutProxy | Any,
    *,
    fmt: str,
    top_k: int,
    batch_size: int,
    threads: int | None,
    progress: str,
    to_terminal: bool,
) -> Stats:
    """Classify every image under `paths` and write a row for each as it comes; failures go to stderr (and
    into the output too with --format parquet). `clf` is the local engine (a Classifier) or a RayEngine."""
    writer = Writer(f, fmt, clf.labels, top_k)
    bar = Bar(progress, "classified", stdout_is_terminal=to_terminal)
    stats = Stats()
    t0 = time.perf_counter()
    writer.start()
    try:
        for r in predict(clf, paths, top_k=top_k, batch_size=batch_size, threads=threads):
            if isinstance(r, Failure):
                stats.failed += 1
                bar.say(f"error: {escape_name(r.message)}")
                writer.failure(r)
            else:
                stats.done += 1
                writer.row(r)
                if stats.done % batch_size == 0:
                    f.flush()  # a reader downstream of a pipe sees each batch as it is done
            bar.update(stats.done, stats.failed)
        writer.end()
        f.flush()
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    _summary(bar, stats)
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


def _summary(bar: Bar, stats: Stats) -> None:
    if bar.shown:  # only after a run long enough to have shown a bar
        ips = stats.done / max(stats.seconds, 1e-9)
        print(f"classified {stats.done:,} images in {stats.seconds:.1f} s ({ips:,.0f} images/s)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Engines: this process (a Classifier) or a Ray cluster (cifarkit.ray_engine.RayEngine)
# ---------------------------------------------------------------------------------------------------------


def predict(clf: Any, plan: InputPlan, *, top_k: int, batch_size: int, threads: int | None) -> Iterator[Result]:
    """The results for every input of `plan`, in input order, from either engine."""
    if isinstance(clf, Classifier):
        return clf.predict_paths(plan.items(), top_k=top_k, batch_size=batch_size, threads=threads)
    return clf.predict_plan(plan, top_k=top_k, batch_size=batch_size)


def classify_tables(
    engine: Any, plan: InputPlan, parts: Any, *, top_k: int, batch_size: int, progress: str, **_: Any
) -> Stats:
    """--engine ray --format parquet: the actors send the output tables themselves; the driver writes them and
    names each failed input on stderr, with no Python object per classified image."""
    bar = Bar(progress, "classified")
    stats = Stats()
    t0 = time.perf_counter()
    try:
        for table in engine.predict_tables(plan, top_k=top_k, batch_size=batch_size):
            errors = table.column("error").drop_null().to_pylist()  # already escaped, as the row's text
            for message in errors:
                bar.say(f"error: {message}")
            stats.failed += len(errors)
            stats.done += table.num_rows - len(errors)
            parts.table(table)
            bar.update(stats.done, stats.failed)
        parts.close()
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    _summary(bar, stats)
    return stats


def _check_engine(args: argparse.Namespace) -> None:
    if args.engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {args.engine!r}")
    if args.engine != "ray" and (args.ray_address is not None or args.ray_actors is not None):
        fail("--ray-address and --ray-actors go with --engine ray")
    if args.ray_actors is not None and args.ray_actors < 1:
        fail(f"--ray-actors must be at least 1, got {args.ray_actors}")
    if args.engine == "ray" and args.device not in ("auto", "cpu"):
        fail(f"--engine ray runs the model on the actors' CPUs; --device {args.device} is for the local engine")


def _check_output_folder(output: str | None) -> None:
    """--format parquet writes a new folder: OUTPUT must be given, must not exist, and its parent must."""
    if output is None:
        fail("--format parquet writes a folder of part files: name it with --output FOLDER")
    if os.path.lexists(output):
        fail(f"--output {output} already exists; --format parquet writes a new folder (it never writes into one)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        fail(f"--output: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--output: cannot write to folder {parent} (permission denied)")


def _ray_engine(clf: Classifier, address: str | None, actors: int | None, *, debug: bool) -> Any:
    from cifarkit.ray_engine import RayEngine

    return RayEngine.connect(clf, address=address, actors=actors, quiet=not debug)


if __name__ == "__main__":
    app()
