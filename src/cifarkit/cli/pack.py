"""`cifar-pack`: stream folders of images into Parquet shards of (path, bytes) of a bounded size.

cifar-pack photos/ --out shards/ --shard-size 256M

Both inference engines read the shards (`cifar-infer shards/ ...`): listing and opening millions of small files
is then a few large sequential reads. Exit status: 0 every file packed, 1 some files could not be read (each
named on stderr; the others are packed), 2 usage error (nothing written), 130 interrupted.
"""

from __future__ import annotations

import sys

from cifarkit.cli import EXIT_FAILED, EXIT_OK, console
from cifarkit.cli.progress import run_reported
from cifarkit.cli.shell import Command, Progress
from cifarkit.pack import PackConfig


def run(cfg: PackConfig, opts: Progress) -> int:
    from cifarkit.pack import pack

    result, _ = run_reported(pack, cfg, opts.progress, debug=opts.debug, info=sys.stderr)
    print(
        f"packed {result.files:,} files ({result.bytes / 2**20:,.1f} MiB) into {len(result.shards)} shard(s) "
        f"in {cfg.out} ({result.seconds:.1f} s)"
    )
    if result.failed:
        print(f"{result.failed} file(s) could not be read and were left out; see the lines above", file=sys.stderr)
    return EXIT_FAILED if result.failed else EXIT_OK


COMMAND = Command(
    "cifar-pack",
    PackConfig,
    run,
    extras=Progress,
    help="Stream folders of images into Parquet shards of (path, bytes) of a bounded size, which cifar-infer reads "
    "like the folders. Exit status: 0 all packed, 1 some files left out (each named on stderr), 2 usage error "
    "(nothing written).",
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND(argv)


if __name__ == "__main__":
    console(main)
