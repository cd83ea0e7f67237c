"""Writing to streams that can fail under us: standard output full (`> /dev/full`), closed (`>&-`) or failing,
and an --output that is a device or a FIFO. Pure Python.

A GuardedStream turns such a failure into one StreamError that names the stream ("standard output: cannot
write (No space left on device)", "standard output is closed") instead of an OSError deep inside whatever was
printing; a reader that has gone (BrokenPipeError: `cifar-infer photos/ | head`) is left to the caller, which
stops quietly. After a failure the stream swallows further writes, and a descriptor of its own is pointed at
/dev/null, so that the interpreter's final flush has nothing left to fail on.

    sys.stdout = GuardedStream(sys.stdout)       # what every console script does first
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

from cifarkit.errors import StreamError


class GuardedStream:
    """A text stream (None: closed) whose write and flush failures are StreamErrors naming it."""

    def __init__(self, stream: Any, label: str = "standard output") -> None:
        self._stream, self.label = stream, label
        self.failed = False

    def write(self, text: str) -> int:
        return self._do("write", text)

    def flush(self) -> None:
        if self._stream is not None:
            self._do("flush")

    def _do(self, method: str, *args: Any) -> Any:
        if self.failed:
            return len(args[0]) if args else None
        if self._stream is None:
            self._fail(f"{self.label} is closed")
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise  # the reader has gone: the caller decides (cifar-infer stops quietly)
        except (OSError, ValueError) as exc:  # ValueError: a stream someone else closed
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._fail(f"{self.label}: cannot write ({why})")

    def _fail(self, message: str) -> None:
        self.failed = True
        with contextlib.suppress(Exception):  # what is still buffered goes nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        raise StreamError(message)

    def isatty(self) -> bool:
        return self._stream is not None and not self.failed and self._stream.isatty()

    def fileno(self) -> int:
        if self._stream is None:
            raise io.UnsupportedOperation(f"{self.label} is closed")
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        if self._stream is None:
            raise AttributeError(f"{self.label} is closed")
        return getattr(self._stream, name)
