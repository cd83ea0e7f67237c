"""Command-line front ends, one module per console script (train, export, infer, pack, eval, serve). Each module builds
its command from its stage's config (cifarkit.cli.shell), calls the stage and prints; every `main(argv)`
returns the exit status. This module holds the exit rules they share and imports nothing heavy: `cifar-infer`
must start fast and never import torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1  # a run that could not finish (or, for cifar-infer, cifar-pack and cifar-eval, some inputs failed)
EXIT_USAGE = 2  # bad input: options, files, checkpoints; nothing was written
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    say_error(message)
    raise SystemExit(code)


def say_error(message: str) -> None:
    """One line on stderr; names from data are escaped (cifarkit.escape), so no control character from a
    file name reaches the terminal and a newline in one cannot split the line."""
    from cifarkit.escape import escape_name

    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):  # a closed or full stderr: the exit status still tells
            print(f"error: {escape_name(message)}", file=sys.stderr, flush=True)


def guarded(fn: Callable[[], T], *, debug: bool) -> T:
    """Run `fn`; a CifarkitError becomes one line on stderr and exit 2, Ctrl-C exit 130, a full or closed
    standard output one line and exit 2, and any other exception a short message and exit 1 (the full
    traceback with --debug)."""
    from cifarkit.errors import CifarkitError, first_line

    try:
        return fn()
    except CifarkitError as exc:
        if debug:
            _traceback()
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except Exception as exc:  # a bug or an environment problem: say what, point at --debug
        if debug:
            _traceback()
            raise SystemExit(EXIT_FAILED) from None
        fail(f"{type(exc).__name__}: {first_line(exc)} (run again with --debug for the traceback)", EXIT_FAILED)


def quiet_broken_pipe(fn: Callable[[], T]) -> T:
    """fn(); if the reader of standard output has gone (`cifar-infer photos/ | head`), stop quietly with exit 1:
    stdout is pointed at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        return fn()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_FAILED) from None


def write_out(text: str, stream: object = None) -> None:
    """A line on standard output (or `stream`). If the reader has gone (`cifar-eval ... | head`), the rest of the
    output goes to /dev/null and the run goes on, so that its files are still written."""
    out = stream if stream is not None else sys.stdout
    try:
        print(text, file=out, flush=True)  # type: ignore[arg-type]
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())  # type: ignore[union-attr]


def inputs_status(failed: int, total: int) -> int:
    """The exit status of a run over many inputs, and the closing line on stderr when some failed (each was
    named on its own line as it failed)."""
    if not failed:
        return EXIT_OK
    print(f"{failed:,} of {total:,} input(s) failed; see the lines above", file=sys.stderr)
    return EXIT_FAILED


def _traceback() -> None:
    import traceback

    traceback.print_exc()


def interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """End the process now, after the clean-up that ran while the exception unwound (temporary files
    removed): one line and exit 130 (Ctrl-C) or 143 (SIGTERM). os._exit rather than SystemExit: a worker
    thread stuck in a C library (onnxruntime running a crafted graph) must not keep the process alive."""
    from cifarkit.errors import Terminated

    terminated = isinstance(exc, Terminated)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say there
            stream.flush()
    with contextlib.suppress(Exception):
        print("terminated" if terminated else "interrupted", file=sys.stderr, flush=True)
    os._exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def handle_signals() -> None:
    """SIGTERM raises Terminated in the main thread, as SIGINT raises KeyboardInterrupt (only the main thread
    can install handlers; elsewhere this is a no-op)."""
    from cifarkit.errors import Terminated

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    with contextlib.suppress(ValueError):  # not the main thread (an embedding app): leave its handlers alone
        signal.signal(signal.SIGTERM, on_term)


def console(main: Callable[[], int]) -> NoReturn:
    """Run a console script's main with the signal rules: SIGINT and SIGTERM end it within a moment, with
    one line and exit 130 / 143, wherever they arrive (importing torch, parsing options, running). Standard
    output is guarded (cifarkit.streams): full or closed, it is one line and exit 2, whoever was writing."""
    from cifarkit.errors import StreamError
    from cifarkit.streams import GuardedStream

    handle_signals()
    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = GuardedStream(sys.stdout)
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except StreamError as exc:  # written outside guarded(): a result printed at the end, the final flush
        fail(str(exc))
    raise SystemExit(code)


def _script(module: str) -> Callable[[], None]:
    """A console script's entry point: the signal rules first, then import the command (which may import torch
    for seconds) and run its main(), so that Ctrl-C or SIGTERM during the imports ends cleanly too."""

    def main() -> None:
        import importlib

        console(lambda: importlib.import_module(f"cifarkit.cli.{module}").main())

    main.__name__ = main.__qualname__ = f"cifar_{module}"
    return main


# [project.scripts] in pyproject.toml points at these.
cifar_train = _script("train")
cifar_export = _script("export")
cifar_infer = _script("infer")
cifar_eval = _script("eval")
cifar_pack = _script("pack")
cifar_serve = _script("serve")
