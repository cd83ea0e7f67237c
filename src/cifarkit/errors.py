"""The one error type the library raises for problems a user can fix (bad input, missing files, ...).

The CLI prints its message as one line and exits non-zero; anything else is a bug and gets a traceback.
"""


class CifarkitError(Exception):
    """A problem the user can act on. The message names the file or option and what was expected."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters:
    library messages can span pages, and ours are one line."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
