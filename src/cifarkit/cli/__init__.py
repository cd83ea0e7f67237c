"""Command-line front ends, one module per console script (train, export, infer). Each parses options,
builds a config, calls one library function and prints. This module holds what they share and imports
nothing heavy: `cifar-infer` must start fast and never import torch.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1  # a run that could not finish (or, for cifar-infer, some inputs failed)
EXIT_USAGE = 2  # bad input: options, files, checkpoints; nothing was written


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def guarded(fn: Callable[[], T], *, debug: bool) -> T:
    """Run `fn`; a CifarkitError becomes one line on stderr and exit 2, Ctrl-C exit 130, and any other
    exception a short message and exit 1 (the full traceback with --debug)."""
    from cifarkit.errors import CifarkitError, first_line

    try:
        return fn()
    except CifarkitError as exc:
        if debug:
            traceback.print_exc()
        fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # a bug or an environment problem: say what, point at --debug
        if debug:
            traceback.print_exc()
            raise SystemExit(EXIT_FAILED) from None
        fail(f"{type(exc).__name__}: {first_line(exc)} (run again with --debug for the traceback)", EXIT_FAILED)


def make_app(help_text: str):
    import typer

    return typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        help=help_text,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
