"""The shard format and how it is read: Parquet files of (path, bytes) that `cifar-pack` (cifarkit.pack) writes
and every inference engine reads (cifarkit.infer.inputs), and objects under URIs pyarrow's filesystems read.

Listing and opening 100M small files is itself the bottleneck at scale (ray-project/ray#40686): packed into
shards of a bounded size, the same images are read with a few large sequential reads, by any number of
machines. A shard is a Parquet file with two columns, in the order the folder walk met the files:

    path   binary   the file's name as the walk gave it, as bytes (os.fsencode: exact for any file name)
    bytes  binary   the file, as stored (JPEG, PNG, ...): decoding happens at inference, by the one rule

Readers also accept `path` as a string column (shards made by other tools). pyarrow is imported only when a
shard, a URI or a Parquet output is met, so `cifar-infer photos/` never loads it.

    shard = check_shard("shards/part-00000.parquet")            # the footer: columns and row groups
    for blob in read_group(shard.source, 0):                      # Blob(source, data), lazily
        ...
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cifarkit.errors import CifarkitError, first_line
from cifarkit.escape import escape_name
from cifarkit.files import IMAGE_EXTENSIONS, Blob, Failure

SHARD_SUFFIX = ".parquet"
MANIFEST = "_cifar-pack.json"  # what cifar-pack wrote; Parquet readers skip names that start with "_"
SHARD_FORMAT = "cifarkit.shards/1"
PATH, BYTES = "path", "bytes"  # the shard columns

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
