"""``UserError``: what the command line prints as one ``error:`` line and exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a params key, a file, a path, a run id): the message is one line
    naming the culprit. Raised by every layer; only the CLI turns it into an exit code."""
