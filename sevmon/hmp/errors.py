"""The one exception HMP argument parsers raise."""

from __future__ import annotations


class HmpError(Exception):
    """An HMP command failed with a message for the user.

    ``str(err)`` is QEMU's text *without* the trailing newline, e.g.
    ``"invalid char in format: 'z'"`` or ``"unexpected end of expression"``; the HMP
    dispatcher prints it (and, for argument errors, QEMU's ``Try "help x" ...`` line).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
