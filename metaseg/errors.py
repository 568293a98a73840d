"""One exception type for problems the user can fix (bad path, bad file, bad argument).

The CLI turns it into one readable line and exit code 2; the server into a 4xx. Anything else is a bug.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that says what is wrong."""
