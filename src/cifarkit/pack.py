"""Pack stage: PackConfig -> pack() -> PackResult: folders of images streamed into Parquet shards of (path, bytes)
of a bounded size, which every inference engine reads like the folders (cifarkit.shards is the format).

    from cifarkit.pack import PackConfig, pack
    result = pack(PackConfig(inputs=("photos/",), out="shards/"))     # shards/part-00000.parquet, ...

Files are taken by the folder rules of cifar-infer (recursive, sorted, hidden entries skipped, image extensions)
and stored as they are; decoding happens at inference. The output folder appears only when complete; memory
holds one row group.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cifarkit.atomic import staged_folder
from cifarkit.errors import CifarkitError
from cifarkit.escape import escape_name
from cifarkit.files import Failure, NotRegularFile, iter_image_files, read_regular, stat_reason
from cifarkit.shards import BYTES, MANIFEST, PATH, SHARD_FORMAT, SHARD_SUFFIX, pyarrow_modules
from cifarkit.stage import REQUIRED, Reporter, Silent, argument, option

PACK_MAX_FILE_BYTES = 64 << 20  # a bigger file is left out of the shards (and named): classify it from its folder
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'256M', '1G', '512k', '1048576' -> bytes (binary units); ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?B)?\s*", text)
    if not m or int(m[1]) < 1:
        raise ValueError(f"expected a size like 256M, 1G or 65536, got {text!r}")
    return int(m[1]) * _UNITS[m[2].upper()]


@dataclass(frozen=True)
class PackConfig:
    """A pack of `inputs` into the new folder `out`. Each option's flag is cifar-pack's."""

    inputs: tuple[str, ...] = argument(help="Folders (or files) of images.", metavar="FOLDER")
    out: str = option(REQUIRED, "--out", "-o", help="The shard folder to create (it must not exist).")
    shard_bytes: int = option(  # bytes of images per shard at most (a bigger file gets a shard of its own)
        256 << 20,
        "--shard-size",
        parse=parse_size,
        metavar="SIZE",
        help="Image bytes per shard at most (default 256M).",
    )
    shard_rows: int = option(100_000, "--shard-rows", help="Images per shard at most.")
    group_bytes: int = option(  # what a reader holds in memory
        16 << 20,
        "--group-size",
        parse=parse_size,
        metavar="SIZE",
        help="Image bytes per row group, what a reader holds in memory (default 16M).",
    )
    group_rows: int = option(1024, "--group-rows", help="Images per row group: one Ray task.")

    def validate(self) -> None:
        if not self.inputs:
            raise CifarkitError("nothing to pack: give at least one folder")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                flag = f.metadata.get("flags", ("",))[0] or f.name
                raise CifarkitError(f"{flag} must be a positive integer, got {value!r}")


@dataclass
class PackResult:
    files: int = 0  # images packed
    bytes: int = 0  # their total size
    shards: list[dict[str, Any]] = field(default_factory=list)  # name, rows, bytes of each shard
    failed: int = 0  # inputs left out (each told to the reporter as an error note)
    seconds: float = 0.0


def pack(cfg: PackConfig, reporter: Reporter | None = None) -> PackResult:
    """Stream the image files under `cfg.inputs` into Parquet shards in the new folder `cfg.out`, which appears
    only when complete. Files that cannot be read are left out, each told to `reporter` as an error note;
    if none can be read, a CifarkitError says why and nothing is written."""
    cfg.validate()
    rep = reporter or Silent()
    paths = [os.fspath(p) for p in cfg.inputs]
    pa, pq = pyarrow_modules()
    result = PackResult()
    t0 = time.perf_counter()
    rep.phase("packed")
    with staged_folder(cfg.out, "--out") as tmp:
        # Failures before the first readable file are held back: if there is none, the one error says why.
        held: list[Failure] = []
        writer = _ShardWriter(tmp, cfg, pa, pq)
        for item in iter_image_files(paths):
            data = _read_for_pack(item) if isinstance(item, str) else item
            if isinstance(data, Failure):
                result.failed += 1
                if result.files == 0:
                    held.append(data)
                else:
                    rep.note(data.message, "error")
                continue
            if result.files == 0:
                for failure in held:
                    rep.note(failure.message, "error")
            writer.add(os.fsencode(item), data)
            result.files += 1
            result.bytes += len(data)
            rep.progress(result.files, failed=result.failed)
        result.shards = writer.close()
        if not result.files:
            more = f" (and {len(held) - 1} more)" if len(held) > 1 else ""
            raise CifarkitError(f"nothing to pack: {held[0].message}{more}" if held else "nothing to pack")
        result.seconds = time.perf_counter() - t0
        manifest = {"format": SHARD_FORMAT, "sources": [escape_name(p) for p in paths], **asdict(result)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return result


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
