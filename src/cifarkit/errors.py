"""The one error type the library raises for problems a user can fix (bad input, missing files, ...), and
the exception SIGTERM becomes.

The CLI prints a CifarkitError's message as one line and exits 2; anything else is a bug and gets a short
message (a traceback with --debug).
"""


class CifarkitError(Exception):
    """A problem the user can act on. The message names the file or option and what was expected. The command
    line prints it as one line and exits with `exit_code` (2: bad input, nothing written)."""

    exit_code = 2


class GateError(CifarkitError):
    """A result that was made but not good enough to keep (an int8 model losing more accuracy than --max-drop):
    nothing written, exit 1, the figures in the message."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up runs
    (temporary files removed, nothing half-written); the CLI exits 143 instead of 130."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), at most `limit` characters,
    shortened at a word boundary with an ellipsis rather than cut mid-word: library messages can span pages,
    and ours are one line."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) <= limit:
        return line
    cut = line[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


class StreamError(CifarkitError):
    """Standard output (or an --output written as a stream) could not be written: closed, or a full or failing
    device. One line and exit 2, like any bad input: nothing the program could do about it."""
