"""Exception types for problems the user can fix (bad path, bad file, bad argument), by category.

The CLI turns any of them into one readable line and exit code 2; the server picks the HTTP status from the class
(serve/errors.py), never from the message. Anything else is a bug.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that says what is wrong (corrupt, truncated, inconsistent)."""


class TooLarge(UserError):
    """The input is valid but over a limit: bytes, pixels, frames, files, decoded memory, decompressed size, time."""


class Unsupported(UserError):
    """The input is not a format or encoding that metaseg decodes."""


class Mismatch(UserError):
    """Parts of the input that must belong together do not: sequences of other geometry, several series where one
    series or a study's three sequences were expected."""
