"""Where inference results go: the text formats (table, csv, json, jsonl) written row by row as predictions come,
the Parquet prediction dataset (`parquet`: a folder of part files with a row for every input, failed ones
included), and the rule for --output.

Names from data (paths, class names) are escaped by one reversible rule (cifarkit.escape): table and csv
carry escape_name's text, json and jsonl JSON strings, Parquet the csv text; no format can be broken by a name,
and none passes a control character to a terminal.

The output rule: no --output writes to the caller's stream (stdout); an --output that names a character device,
a FIFO or the process's own standard output (/dev/stdout, or the file stdout is appended to) is written directly,
never replaced by a rename; any other --output is a regular file written atomically (a temporary file renamed
over it at the end), which must not be the model or an input.

    with text_output("predictions.csv", sys.stdout) as f:
        writer = Writer(f, "csv", labels, top_k); writer.start(); writer.row(prediction); writer.end()
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cifarkit.errors import CifarkitError
from cifarkit.escape import escape_name, json_line
from cifarkit.files import Failure, file_kind, has_image_extension
from cifarkit.infer.classifier import Prediction
from cifarkit.shards import SHARD_SUFFIX, pyarrow_modules

TEXT_FORMATS = ("table", "csv", "json", "jsonl")


# ---------------------------------------------------------------------------------------------------------
# Text formats
# ---------------------------------------------------------------------------------------------------------


class Writer:
    """table: aligned columns, path last (rows stream out before the longest path is known, while the label
    width is known from the model's class names); csv: path,label,index,probability then label_2,
    probability_2, ... for top-k > 1; jsonl: one object a line; json: one array of those objects."""

    def __init__(self, f: IO[str] | Any, fmt: str, labels: tuple[str, ...], top_k: int) -> None:
        if fmt not in TEXT_FORMATS:
            raise ValueError(f"unknown text format {fmt!r}")
        self.f, self.fmt, self.k = f, fmt, top_k
        self.names = {label: escape_name(label) for label in labels}  # escaped once, not per row
        self.width = max(5, *(len(name) for name in self.names.values()))
        self.csv = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        self.rows = 0

    def start(self) -> None:
        if self.fmt == "table":
            cells = [f"{'label' if i == 0 else f'#{i + 1}':<{self.width}}   prob" for i in range(self.k)]
            self.f.write("  ".join(cells) + "  path\n")
        elif self.fmt == "csv":
            extra = [c for i in range(2, self.k + 1) for c in (f"label_{i}", f"probability_{i}")]
            self.csv.writerow(["path", "label", "index", "probability", *extra])
        elif self.fmt == "json":
            self.f.write("[")

    def row(self, p: Prediction) -> None:
        names = self.names
        if self.fmt == "table":
            cells = [f"{names[label]:<{self.width}} {100 * prob:5.1f}%" for label, prob in p.top_k]
            self.f.write("  ".join(cells) + f"  {escape_name(p.source)}\n")
        elif self.fmt == "csv":
            extra = [v for label, prob in p.top_k[1:] for v in (names[label], f"{prob:.6f}")]
            self.csv.writerow([escape_name(p.source), names[p.label], p.index, f"{p.probability:.6f}", *extra])
        else:
            text = json_line(p.to_dict())
            if self.fmt == "json":
                text = ("\n" if self.rows == 0 else ",\n") + text
            self.f.write(text + ("\n" if self.fmt == "jsonl" else ""))
        self.rows += 1

    def end(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n")


class StdoutProxy:
    """The caller's stream, or sys.stdout looked up on every write (a progress bar or a test runner may swap
    it during the run); a name the stream's encoding cannot carry is written with backslash escapes."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        out = self.stream or sys.stdout
        try:
            return out.write(text)
        except UnicodeEncodeError:  # a file name that is not valid UTF-8 (or not in the terminal's encoding)
            enc = getattr(out, "encoding", None) or "utf-8"
            return out.write(text.encode(enc, "backslashreplace").decode(enc))

    def flush(self) -> None:
        (self.stream or sys.stdout).flush()


# ---------------------------------------------------------------------------------------------------------
# --output
# ---------------------------------------------------------------------------------------------------------


def output_kind(output: str) -> str:
    """ "stdout" (the process's own standard output), "direct" (a character device or a FIFO: written as it is)
    or "file" (a regular file or a new name: written atomically). A CifarkitError for anything else."""
    try:
        st = os.stat(output)  # follows symlinks: /dev/stdout -> /proc/self/fd/1 -> the pipe, tty or file
    except FileNotFoundError:
        return "file"
    except OSError as exc:
        raise CifarkitError(f"--output {output}: cannot use it ({exc.strerror or exc})") from None
    try:
        own = os.fstat(sys.stdout.fileno()) if sys.stdout is not None else None
    except (OSError, ValueError, io.UnsupportedOperation):  # closed, or a stream without a descriptor
        own = None
    if own is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
        return "stdout"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "direct"
    if stat.S_ISDIR(st.st_mode):
        raise CifarkitError(f"--output {output} is a folder, expected a file name")
    if not stat.S_ISREG(st.st_mode):
        raise CifarkitError(f"--output {output} is {file_kind(st.st_mode)}; refusing to write over it")
    return "file"


def check_output(output: str, inputs: Iterable[str], model: str | None = None) -> None:
    """A file --output must be one we may replace: not a folder, not one of the inputs or the model, in a
    folder that exists and is writable (a symlink is followed: its target file is replaced, the link stays)."""
    if output_kind(output) != "file":
        return
    from cifarkit.atomic import write_target

    target = write_target(output, "--output")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise CifarkitError(f"--output: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CifarkitError(f"--output: cannot write to folder {folder} (permission denied)")
    if not os.path.exists(target):
        return
    if model is not None and _same_file(target, model):
        raise CifarkitError(f"--output {output} is the model file; refusing to write over it")
    for path in inputs:
        inside = os.path.isdir(path) and _under(target, path) and has_image_extension(str(target))
        if inside or (os.path.isfile(path) and _same_file(target, path)):
            raise CifarkitError(f"--output {output} is one of the inputs ({path}); refusing to write over it")


@contextlib.contextmanager
def text_output(output: str | None, stream: IO[str] | None = None) -> Iterator[Any]:
    """The stream text results are written to, by the output rule (module docstring)."""
    kind = "stdout" if output is None else output_kind(output)
    if kind == "stdout":
        proxy = StdoutProxy(stream)
        yield proxy
        proxy.flush()
        return
    assert output is not None
    if kind == "direct":
        try:  # O_NONBLOCK: a FIFO that nobody reads is an error now (ENXIO), not a wait forever
            fd = os.open(output, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            why = "a FIFO that no process reads; start its reader first" if exc.errno == errno.ENXIO else exc.strerror
            raise CifarkitError(f"--output {output}: cannot write to it ({why})") from None
        os.set_blocking(fd, True)
        with open(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        return
    from cifarkit.atomic import atomic_path  # only for a file: tempfile is not loaded for stdout

    with atomic_path(output, "--output") as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def check_output_folder(output: str | None) -> None:
    """--format parquet writes a new folder: OUTPUT must be given, must not exist, and its parent must."""
    if output is None:
        raise CifarkitError("--format parquet writes a folder of part files: name it with --output FOLDER")
    if os.path.lexists(output):
        raise CifarkitError(
            f"--output {output} already exists; --format parquet writes a new folder (it never writes into one)"
        )
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CifarkitError(f"--output: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CifarkitError(f"--output: cannot write to folder {parent} (permission denied)")


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _under(path: str | os.PathLike[str], folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


# ---------------------------------------------------------------------------------------------------------
# Parquet: a dataset folder of part files (--format parquet)
# ---------------------------------------------------------------------------------------------------------

PART_ROWS = 1_000_000  # rows per part file (~20-60 MB)
GROUP_ROWS = 65_536  # rows per row group: what the writer buffers


def prediction_schema(pa: Any) -> Any:
    """One row per input, in input order. `path` (and `label`) are the text the csv format writes (cifarkit.escape:
    non-UTF-8 bytes as \\xNN, control characters escaped; unescape_name gives the name back); `error` is null
    for a classified image, and the other columns are null for an input that failed."""
    top = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("index", pa.int32()),
            ("probability", pa.float32()),  # the model's float32 softmax output, as computed
            ("top_k", top),
            ("error", pa.string()),
        ]
    )


class PredictionRows:
    """Results -> the columns of prediction_schema, names escaped as the csv format writes them."""

    def __init__(self, pa: Any) -> None:
        self.pa, self.schema = pa, prediction_schema(pa)
        self.columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        self.names: dict[str, str] = {}  # class name -> its escaped text, escaped once

    def __len__(self) -> int:
        return len(self.columns["path"])

    def add(self, r: Any) -> None:
        """A Prediction, or a Failure (then only path and error are set)."""
        c = self.columns
        c["path"].append(escape_name(r.source))
        if isinstance(r, Failure):
            for name in ("label", "index", "probability", "top_k"):
                c[name].append(None)
            c["error"].append(escape_name(r.message))
            return
        c["label"].append(self._name(r.label))
        c["index"].append(r.index)
        c["probability"].append(r.probability)
        c["top_k"].append([{"label": self._name(label), "probability": q} for label, q in r.top_k])
        c["error"].append(None)

    def _name(self, label: str) -> str:
        text = self.names.get(label)
        return text if text is not None else self.names.setdefault(label, escape_name(label))

    def table(self) -> Any:
        """The rows so far as a pyarrow Table; the buffer starts again empty."""
        table = self.pa.Table.from_pydict(self.columns, schema=self.schema)
        self.columns = {name: [] for name in self.schema.names}
        return table


def prediction_table(results: Iterable[Any]) -> Any:
    """Predictions and Failures -> one pyarrow Table in prediction_schema (what a Ray actor sends back)."""
    rows = PredictionRows(pyarrow_modules()[0])
    for r in results:
        rows.add(r)
    return rows.table()


class PredictionParts:
    """Tables in prediction_schema -> part-NNNNN.parquet files in `folder` (the temporary folder of
    atomic.staged_folder), at most `part_rows` rows each, written a row group of `group_rows` at a time: memory
    holds at most that many rows (plus one table handed in)."""

    def __init__(self, folder: Path, part_rows: int = PART_ROWS, group_rows: int = GROUP_ROWS) -> None:
        self.pa, self.pq = pyarrow_modules()
        self.schema = prediction_schema(self.pa)
        self.folder, self.part_rows, self.group_rows = folder, part_rows, group_rows
        self.pending: list[Any] = []  # tables waiting for a full row group
        self.pending_rows = 0
        self.writer: Any = None
        self.parts = 0
        self.in_part = 0  # rows in the part being written

    def table(self, table: Any) -> None:
        """A table in prediction_schema (PredictionRows.table, prediction_table), written as row groups fill."""
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= min(self.group_rows, self.part_rows - self.in_part):
            self._write(final=False)

    def _write(self, final: bool) -> None:
        table = self.pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.pending_rows = [], 0
        while table is not None and table.num_rows:
            room = self.part_rows - self.in_part
            if not final and table.num_rows < min(self.group_rows, room):
                self.pending, self.pending_rows = [table], table.num_rows
                return
            head, table = table.slice(0, room), table.slice(room)
            if not final and head.num_rows < room:  # keep the incomplete last group for later
                full = head.num_rows // self.group_rows * self.group_rows
                head, rest = head.slice(0, full), head.slice(full)
                self.pending, self.pending_rows = [rest], rest.num_rows
                table = None
            if self.writer is None:
                self.writer = self.pq.ParquetWriter(
                    Path(self.folder) / f"part-{self.parts:05d}{SHARD_SUFFIX}", self.schema
                )
                self.parts += 1
            self.writer.write_table(head, row_group_size=self.group_rows)
            self.in_part += head.num_rows
            if self.in_part >= self.part_rows:
                self.writer.close()
                self.writer, self.in_part = None, 0

    def close(self) -> None:
        """Write what is buffered and close the last part. A run without any input still writes one (empty)
        part, so that readers find the schema."""
        self._write(final=True)
        if self.writer is None and self.parts == 0:
            self.writer = self.pq.ParquetWriter(Path(self.folder) / f"part-00000{SHARD_SUFFIX}", self.schema)
            self.parts = 1
        if self.writer is not None:
            self.writer.close()
            self.writer = None
