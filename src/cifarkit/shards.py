"""Parquet in and out: shards of (path, bytes) that `cifar-pack` writes and both inference engines read, the
plan of a command's inputs (folders, shards, URIs), and the prediction dataset `--format parquet` writes.

Listing and opening 100M small files is itself the bottleneck at scale (ray-project/ray#40686): packed into
shards of a bounded size, the same images are read with a few large sequential reads, by any number of
machines. A shard is a Parquet file with two columns, in the order the folder walk met the files:

    path   binary   the file's name as the walk gave it, as bytes (os.fsencode: exact for any file name)
    bytes  binary   the file, as stored (JPEG, PNG, ...): decoding happens at inference, by the one rule

Readers also accept `path` as a string column (shards made by other tools). pyarrow is imported only when a
shard, a URI or a Parquet output is met, so `cifar-infer photos/` never loads it.

    summary = pack(["photos/"], "shards/")                        # shards/part-00000.parquet, ...
    plan = InputPlan.resolve(["shards/", "more/", "s3://bucket/photos/"])    # every shard's footer checked
    for item in plan.items():                                     # paths, Blobs (shard rows, objects), Failures
        ...
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarkit.atomic import staged_folder
from cifarkit.errors import CifarkitError, first_line
from cifarkit.escape import escape_name
from cifarkit.files import IMAGE_EXTENSIONS, Blob, Failure, NotRegularFile, iter_image_files, read_regular, stat_reason

SHARD_SUFFIX = ".parquet"
MANIFEST = "_cifar-pack.json"  # what cifar-pack wrote; Parquet readers skip names that start with "_"
SHARD_FORMAT = "cifarkit.shards/1"
PATH, BYTES = "path", "bytes"  # the shard columns
PACK_MAX_FILE_BYTES = 64 << 20  # a bigger file is left out of the shards (and named): classify it from its folder

INSTALL_HINT = "pip install 'cifarkit[parquet]'"


def pyarrow_modules() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or a CifarkitError saying what to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CifarkitError(f"Parquet shards and output need pyarrow: {INSTALL_HINT}") from None
    return pa, pq


# ---------------------------------------------------------------------------------------------------------
# cifar-pack: a folder -> shards of a bounded size
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackConfig:
    shard_bytes: int = 256 << 20  # image bytes per shard at most (a bigger file gets a shard of its own)
    shard_rows: int = 100_000  # images per shard at most
    group_bytes: int = 16 << 20  # image bytes per row group at most: what a reader holds in memory
    group_rows: int = 1024  # images per row group at most (a Ray task classifies one row group)

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise CifarkitError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass
class PackSummary:
    files: int = 0  # images packed
    bytes: int = 0  # their total size
    shards: list[dict[str, Any]] = field(default_factory=list)  # name, rows, bytes of each shard
    failed: int = 0  # inputs left out (each reported through on_failure)
    seconds: float = 0.0


def pack(
    paths: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: PackConfig = PackConfig(),
    *,
    on_failure: Callable[[Failure], None] | None = None,
) -> PackSummary:
    """Stream the image files under `paths` (walked by the inference engines' rules: recursive, sorted, hidden
    entries skipped, image extensions) into Parquet shards in the new folder `out`, which appears only when
    complete. Memory holds one row group. Files that cannot be read are left out and passed to `on_failure`."""
    config.check()
    paths = [os.fspath(p) for p in paths]
    pa, pq = pyarrow_modules()
    summary = PackSummary()
    t0 = time.perf_counter()
    with staged_folder(out, "--out") as tmp:
        # Failures before the first readable file are held back: if there is none, the one error says why.
        held: list[Failure] = []
        writer = _ShardWriter(tmp, config, pa, pq)
        for item in iter_image_files(paths):
            data = _read_for_pack(item) if isinstance(item, str) else item
            if isinstance(data, Failure):
                summary.failed += 1
                if summary.files == 0:
                    held.append(data)
                elif on_failure is not None:
                    on_failure(data)
                continue
            if summary.files == 0 and on_failure is not None:
                for failure in held:
                    on_failure(failure)
            writer.add(os.fsencode(item), data)
            summary.files += 1
            summary.bytes += len(data)
        summary.shards = writer.close()
        if not summary.files:
            more = f" (and {len(held) - 1} more)" if len(held) > 1 else ""
            raise CifarkitError(f"nothing to pack: {held[0].message}{more}" if held else "nothing to pack")
        summary.seconds = time.perf_counter() - t0
        manifest = {"format": SHARD_FORMAT, "sources": [escape_name(p) for p in paths], **asdict(summary)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return summary


def _read_for_pack(path: str) -> bytes | Failure:
    try:
        data = read_regular(path, PACK_MAX_FILE_BYTES)
    except NotRegularFile as exc:
        return Failure(path, f"{path}: {exc.strerror}")
    except OSError as exc:
        return Failure(path, f"{path}: {stat_reason(path, exc)}")
    if data is None:
        return Failure(path, f"{path}: over {PACK_MAX_FILE_BYTES >> 20} MiB, left out of the shards")
    return data


class _ShardWriter:
    """Rows -> part-NNNNN.parquet files under the limits of a PackConfig, one row group buffered at a time."""

    def __init__(self, folder: Path, config: PackConfig, pa: Any, pq: Any) -> None:
        self.folder, self.config, self.pa, self.pq = folder, config, pa, pq
        self.paths: list[bytes] = []
        self.blobs: list[bytes] = []
        self.group_bytes = 0
        self.writer: Any = None
        self.shard_rows = self.shard_bytes = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, path: bytes, data: bytes) -> None:
        cfg = self.config
        rows = self.shard_rows + len(self.paths)
        size = self.shard_bytes + self.group_bytes
        if rows and (rows >= cfg.shard_rows or size + len(data) > cfg.shard_bytes):
            self._close_shard()
        elif self.paths and (len(self.paths) >= cfg.group_rows or self.group_bytes + len(data) > cfg.group_bytes):
            self._write_group()
        self.paths.append(path)  # a file over a limit on its own gets a row group (and a shard) to itself
        self.blobs.append(data)
        self.group_bytes += len(data)

    def _write_group(self) -> None:
        if not self.paths:
            return
        pa = self.pa
        table = pa.table({PATH: pa.array(self.paths, pa.binary()), BYTES: pa.array(self.blobs, pa.binary())})
        if self.writer is None:
            name = f"part-{len(self.shards):05d}{SHARD_SUFFIX}"
            # Encoded images do not compress: no codec, dictionary or statistics for them (min/max statistics
            # of a binary column would copy image bytes into the footer).
            self.writer = self.pq.ParquetWriter(
                self.folder / name,
                table.schema,
                compression={PATH: "zstd", BYTES: "none"},
                use_dictionary=False,
                write_statistics=[PATH],
            )
            self.shards.append({"name": name, "rows": 0, "bytes": 0})
        self.writer.write_table(table, row_group_size=len(self.paths))
        self.shard_rows += len(self.paths)
        self.shard_bytes += self.group_bytes
        self.shards[-1]["rows"] += len(self.paths)
        self.shards[-1]["bytes"] += self.group_bytes
        self.paths, self.blobs, self.group_bytes = [], [], 0

    def _close_shard(self) -> None:
        self._write_group()
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        self.shard_rows = self.shard_bytes = 0

    def close(self) -> list[dict[str, Any]]:
        self._close_shard()
        return self.shards


# ---------------------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    source: str  # a path or a URI
    groups: tuple[int, ...]  # rows in each row group


def is_uri(path: str) -> bool:
    """s3://bucket/key, gs://..., hdfs://host/path, file:///path: anything pyarrow's filesystems read."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def shard_files(path: str) -> list[str] | None:
    """The shard files a local PATH names (itself if it is a .parquet file, the .parquet files at the top of a
    folder, sorted), or None if it is not a shard input."""
    if path.endswith(SHARD_SUFFIX) and os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        return None
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it if e.name.endswith(SHARD_SUFFIX) and not e.name.startswith((".", "_")))
    except OSError:
        return None
    return [os.path.join(path, n) for n in names] or None


def open_shard(source: str) -> Any:
    """pyarrow.parquet.ParquetFile for a shard path or URI (raises pyarrow's or the OS's errors)."""
    _, pq = pyarrow_modules()
    if is_uri(source):
        fs, inner = _filesystem(source)
        return pq.ParquetFile(fs.open_input_file(inner))
    return pq.ParquetFile(source)


def check_shard(source: str) -> Shard:
    """Read a shard's footer: it must be Parquet with a `bytes` binary column and a `path` binary or string
    column. A CifarkitError naming the shard otherwise."""
    pa, _ = pyarrow_modules()
    try:
        meta = open_shard(source).metadata
        schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise CifarkitError(f"shard {escape_name(source)} cannot be read ({first_line(exc, 160)})") from None
    names = schema.names
    ok_path = PATH in names and _is_binary_or_string(pa, schema.field(PATH).type)
    ok_bytes = BYTES in names and _is_binary(pa, schema.field(BYTES).type)
    if not (ok_path and ok_bytes):
        raise CifarkitError(
            f"shard {escape_name(source)} has columns {names}; expected {PATH!r} (binary or string) and "
            f"{BYTES!r} (binary), as cifar-pack writes"
        )
    return Shard(source, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))


def read_group(shard: str, group: int, rows: int = 256) -> Iterator[Blob]:
    """The images of one row group of a shard, as Blobs, lazily: the group is read at once (Parquet's unit),
    its rows become Python objects `rows` at a time."""
    table = open_shard(shard).read_row_group(group, columns=[PATH, BYTES])
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        yield from map(Blob, decode_names(part[PATH]), part[BYTES].to_pylist())


def decode_names(column: Any) -> list[str]:
    """A `path` column (binary: file-name bytes, or string) -> names as Python gives them (os.fsdecode)."""
    values = column.to_pylist()
    if values and isinstance(values[0], bytes):
        return [os.fsdecode(v) for v in values]
    return values


def _is_binary(pa: Any, t: Any) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_binary_or_string(pa: Any, t: Any) -> bool:
    return _is_binary(pa, t) or pa.types.is_string(t) or pa.types.is_large_string(t)


# ---------------------------------------------------------------------------------------------------------
# URIs: anything pyarrow's filesystems read (s3://, gs://, hdfs://, file://)
# ---------------------------------------------------------------------------------------------------------


def _filesystem(uri: str) -> tuple[Any, str]:
    pyarrow_modules()
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise CifarkitError(f"{escape_name(uri)}: cannot open ({first_line(exc, 160)})") from None


def list_uri(uri: str) -> list[str]:
    """The image objects under a URI prefix (or the URI itself if it names one object), by the folder rules:
    sorted, hidden names skipped, image extensions. Names are relative to `uri`. Listing is pyarrow's, done
    at once: for millions of objects, pack them into shards first."""
    import pyarrow.fs

    fs, base = _filesystem(uri)
    try:
        info = fs.get_file_info(base)
        if info.type == pyarrow.fs.FileType.File:
            return [""]
        if info.type != pyarrow.fs.FileType.Directory:
            raise CifarkitError(f"{escape_name(uri)}: no such file or folder")
        base = base.rstrip("/")
        names = []
        for f in fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True)):
            rel = f.path[len(base) :]  # f.path decodes the name: UTF-8 or UnicodeDecodeError
            hidden = any(part.startswith(".") for part in rel.split("/"))
            image = os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
            if f.type == pyarrow.fs.FileType.File and image and not hidden:
                names.append(rel)
    except OSError as exc:
        raise CifarkitError(f"{escape_name(uri)}: cannot list ({first_line(exc, 160)})") from None
    except UnicodeDecodeError:
        raise CifarkitError(
            f"{escape_name(uri)}: holds a file name that is not UTF-8, which pyarrow's filesystems cannot list; "
            "give a local folder as a plain path"
        ) from None
    return sorted(names)


def read_uris(root: str, names: Iterable[str]) -> Iterator[Blob | Failure]:
    """Each object root + name, read whole, as a Blob (a Failure naming it if it cannot be read)."""
    fs, base = _filesystem(root)
    base = base.rstrip("/")  # names start with "/" (or are "" for a URI that names one object)
    for name in names:
        source = root.rstrip("/") + name if name else root
        try:
            with fs.open_input_stream(base + name) as f:
                yield Blob(source, f.readall())
        except OSError as exc:
            yield Failure(source, f"{source}: cannot read ({first_line(exc, 160)})")


# ---------------------------------------------------------------------------------------------------------
# The inputs of a command, planned
# ---------------------------------------------------------------------------------------------------------


@dataclass
class InputPlan:
    """The command's PATHs in order, each resolved to what it is: ("files", path) a file or folder of images,
    walked lazily; ("shards", [Shard, ...]) a .parquet file or a folder of them, every footer checked now;
    ("uri", (uri, names)) an object or prefix in a filesystem pyarrow reads, listed now."""

    entries: list[tuple[str, Any]]

    @classmethod
    def resolve(cls, paths: Iterable[str | os.PathLike[str]]) -> InputPlan:
        """Raises CifarkitError (naming the input) for a shard that cannot be read or a URI that cannot be
        listed: bad input is found before anything is classified or written."""
        entries: list[tuple[str, Any]] = []
        for raw in paths:
            path = os.fspath(raw)
            if is_uri(path):
                if path.endswith(SHARD_SUFFIX):
                    entries.append(("shards", [check_shard(path)]))
                else:
                    entries.append(("uri", (path, list_uri(path))))
                continue
            files = shard_files(path)
            if files is None:
                entries.append(("files", path))
            else:
                entries.append(("shards", [check_shard(f) for f in files]))
        return cls(entries)

    def items(self) -> Iterator[str | Blob | Failure]:
        """What the local engine classifies, lazily and in order: image paths, Blobs, Failures."""
        for kind, value in self.entries:
            if kind == "files":
                yield from iter_image_files([value])
            elif kind == "shards":
                for shard in value:
                    for group in range(len(shard.groups)):
                        yield from read_group(shard.source, group)
            else:
                uri, names = value
                if not names:
                    yield Failure(uri, f"{uri}: no image files found")
                yield from read_uris(uri, names)

    def units(self, size: int) -> Iterator[tuple[str, str, list[Any], int]]:
        """The same inputs as work units for the Ray engine, in order, each read where it is classified:
        ("files", "", [path or Failure, ...], 0) up to `size` paths; ("shard", source, [], row group);
        ("uri", root, [name, ...], 0) up to `size` objects."""
        for kind, value in self.entries:
            if kind == "files":
                chunk: list[Any] = []
                for item in iter_image_files([value]):
                    chunk.append(item)
                    if len(chunk) == size:
                        yield ("files", "", chunk, 0)
                        chunk = []
                if chunk:
                    yield ("files", "", chunk, 0)
            elif kind == "shards":
                for shard in value:
                    for group, rows in enumerate(shard.groups):
                        if rows:
                            yield ("shard", shard.source, [], group)
            else:
                uri, names = value
                if not names:
                    yield ("files", "", [Failure(uri, f"{uri}: no image files found")], 0)
                for start in range(0, len(names), size):
                    yield ("uri", uri, names[start : start + size], 0)


def unit_items(unit: tuple[str, str, list[Any], int]) -> Iterator[str | Blob | Failure]:
    """The images of one work unit (InputPlan.units), read here: where a Ray actor classifies them."""
    kind, root, refs, group = unit
    if kind == "files":
        yield from refs
    elif kind == "shard":
        yield from read_group(root, group)
    else:
        yield from read_uris(root, refs)


# ---------------------------------------------------------------------------------------------------------
# Predictions out: a dataset folder of part files (--format parquet)
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
    """Rows or tables -> part-NNNNN.parquet files in `folder` (the temporary folder of atomic.staged_folder), at most
    `part_rows` rows each, written a row group of `group_rows` at a time: memory holds at most that many rows
    (plus one table handed in)."""

    def __init__(self, folder: Path, part_rows: int = PART_ROWS, group_rows: int = GROUP_ROWS) -> None:
        self.pa, self.pq = pyarrow_modules()
        self.schema = prediction_schema(self.pa)
        self.folder, self.part_rows, self.group_rows = folder, part_rows, group_rows
        self.rows = PredictionRows(self.pa)
        self.pending: list[Any] = []  # tables waiting for a full row group
        self.pending_rows = 0
        self.writer: Any = None
        self.parts = 0
        self.in_part = 0  # rows in the part being written

    def prediction(self, p: Any) -> None:
        self.rows.add(p)
        self._grew(1)

    def failure(self, f: Failure) -> None:
        self.rows.add(f)
        self._grew(1)

    def table(self, table: Any) -> None:
        """A table in prediction_schema (from prediction_table), written without a Python object per row."""
        self._seal()
        self.pending.append(table)
        self._grew(table.num_rows)

    def flush(self) -> None:
        """Nothing to do: row groups are written when full, so that they are not tiny."""

    def _grew(self, n: int) -> None:
        self.pending_rows += n
        if self.pending_rows >= min(self.group_rows, self.part_rows - self.in_part):
            self._write(final=False)

    def _seal(self) -> None:
        if len(self.rows):
            self.pending.append(self.rows.table())

    def _write(self, final: bool) -> None:
        self._seal()
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
                self.writer = self.pq.ParquetWriter(self.folder / f"part-{self.parts:05d}{SHARD_SUFFIX}", self.schema)
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
            self.writer = self.pq.ParquetWriter(self.folder / f"part-00000{SHARD_SUFFIX}", self.schema)
            self.parts = 1
        if self.writer is not None:
            self.writer.close()
            self.writer = None
