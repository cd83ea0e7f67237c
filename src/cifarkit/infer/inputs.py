"""The inputs of an inference run, planned: each PATH resolved to what it is (a file or folder of images, Parquet
shards, an object or prefix under a URI), every shard's footer checked and every URI listed before anything is
classified or written. Every engine takes an InputPlan: the local engine iterates its items, the Ray engine its
work units, each read where it is classified.

    plan = InputPlan.resolve(["photos/", "shards/", "s3://bucket/photos/"])
    for item in plan.items():          # image paths, Blobs (shard rows, objects) and Failures, lazily, in order
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cifarkit.files import Blob, Failure, iter_image_files
from cifarkit.shards import SHARD_SUFFIX, check_shard, is_uri, list_uri, read_group, read_uris, shard_files


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
