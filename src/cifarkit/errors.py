"""The one error type the library raises for problems a user can fix (bad input, missing files, ...).

The CLI prints its message as one line and exits non-zero; anything else is a bug and gets a traceback.
"""


class CifarkitError(Exception):
    """A problem the user can act on. The message names the file or option and what was expected."""
