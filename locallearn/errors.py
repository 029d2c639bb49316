"""Errors a user can fix.

A :class:`UserError` means the input was wrong (an unknown name, a missing file, a K that does not fit the model).
The CLI prints its message as one line and exits with status 2, without a traceback. Its message must say what was
wrong *and* what to do about it.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
