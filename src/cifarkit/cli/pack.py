"""`cifar-pack`: stream folders of images into Parquet shards of (path, bytes) of a bounded size.

cifar-pack photos/ --out shards/ --shard-size 256M

Both inference engines read the shards (`cifar-infer shards/ ...`): listing and opening millions of small
files is then a few large sequential reads. Files are taken by the folder rules of cifar-infer (recursive,
sorted, hidden entries skipped, image extensions) and stored as they are; decoding happens at inference.
The output folder appears only when complete. Exit status: 0 every file packed, 1 some files could not be
read (each named on stderr; the others are packed), 2 usage error (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys

from cifarkit.cli import EXIT_FAILED, EXIT_OK, console, fail, guarded, say_error
from cifarkit.shards import PackConfig

_DEFAULTS = PackConfig()
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2
        fail(f"{message} (see cifar-pack --help)")


def size(text: str) -> int:
    """'256M', '1G', '512k', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?B)?\s*", text)
    if not m or int(m[1]) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 256M, 1G or 65536, got {text!r}")
    return int(m[1]) * _UNITS[m[2].upper()]


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cifar-pack",
        description="Stream folders of images into Parquet shards of (path, bytes) of a bounded size, which "
        "cifar-infer reads like the folders. Exit status: 0 all packed, 1 some files left out (each named on "
        "stderr), 2 usage error (nothing written).",
    )
    p.add_argument("paths", nargs="+", metavar="FOLDER", help="Folders (or files) of images.")
    p.add_argument("-o", "--out", required=True, help="The shard folder to create (it must not exist).")
    p.add_argument(
        "--shard-size",
        type=size,
        default=_DEFAULTS.shard_bytes,
        help=f"Image bytes per shard at most (default {_DEFAULTS.shard_bytes >> 20}M).",
    )
    p.add_argument(
        "--shard-rows",
        type=int,
        default=_DEFAULTS.shard_rows,
        help=f"Images per shard at most (default {_DEFAULTS.shard_rows}).",
    )
    p.add_argument(
        "--group-size",
        type=size,
        default=_DEFAULTS.group_bytes,
        help=f"Image bytes per row group, what a reader holds in memory (default {_DEFAULTS.group_bytes >> 20}M).",
    )
    p.add_argument(
        "--group-rows",
        type=int,
        default=_DEFAULTS.group_rows,
        help=f"Images per row group, one Ray task (default {_DEFAULTS.group_rows}).",
    )
    p.add_argument("--debug", action="store_true", help="Show tracebacks.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = PackConfig(args.shard_size, args.shard_rows, args.group_size, args.group_rows)
    failed = []

    def run():
        from cifarkit.shards import pack

        config.check()
        return pack(args.paths, args.out, config, on_failure=lambda f: (failed.append(f), say_error(f.message)))

    summary = guarded(run, debug=args.debug)
    print(
        f"packed {summary.files:,} files ({summary.bytes / 2**20:,.1f} MiB) into {len(summary.shards)} shard(s) "
        f"in {args.out} ({summary.seconds:.1f} s)"
    )
    if failed:
        print(f"{len(failed)} file(s) could not be read and were left out; see the lines above", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def app(argv: list[str] | None = None) -> None:
    """The console script's entry point, under cifarkit's signal rules (exit 130 / 143)."""
    console(lambda: sys.exit(main(argv)))


if __name__ == "__main__":
    app()
