"""Where inference results go, by one rule for --output:

- none: the caller's stream (stdout);
- a character device, a FIFO, or the process's own standard output (/dev/stdout, or the very file stdout is
  appended to): written directly, as it is, never replaced by a rename (a log that stdout appends to keeps its
  earlier lines; a pipe's reader gets the rows);
- anything else: a regular file written atomically (a temporary file beside it, renamed over it at the end),
  which must not be the model or one of the inputs. A folder, a socket or a block device is refused.

    check_output("predictions.csv", inputs, model)          # before anything is classified
    with text_output("predictions.csv", sys.stdout) as f:  # the stream the rows go to
        ...
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from cifarkit.errors import CifarkitError
from cifarkit.files import file_kind, has_image_extension
from cifarkit.streams import GuardedStream


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
        f = open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed below, whatever happens)
        try:
            guarded = GuardedStream(f, f"--output {output}")  # a full device: one line naming the option
            yield guarded
            guarded.flush()
        finally:
            with contextlib.suppress(OSError):
                f.close()
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
