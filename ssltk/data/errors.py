"""User-facing data errors.

All subclass :class:`ssltk.errors.UserError`, so the CLI prints one line naming the path, file or
value at fault and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

from ssltk.errors import UserError


class DataError(UserError):
    """A dataset on disk is missing, incomplete or unusable."""


class DatasetNotFoundError(DataError):
    """``data.root`` (or another dataset location) does not exist."""

    def __init__(self, path: Path | str, what: str = "dataset root") -> None:
        self.path, self.what = Path(path), what
        super().__init__(f"{what} not found: {self.path}")

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.what)


class MissingFileError(DataError):
    """A file the dataset format requires is absent."""

    def __init__(self, path: Path | str, hint: str = "") -> None:
        self.path, self.hint = Path(path), hint
        super().__init__(f"required file missing: {self.path}{f' ({hint})' if hint else ''}")

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.hint)


class BadImageError(DataError):
    """An image that cannot be read or decoded (raised under ``data.on_bad_image: fail``)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        hint = "set data.on_bad_image: skip to leave such images out"
        super().__init__(f"unreadable image {name}: {reason} ({hint})")

    def __reduce__(self) -> tuple:  # workers send it back pickled
        return type(self), (self.name, self.reason)


class PreparedDataError(DataError):
    """A prepared dataset directory whose manifest or arrays are missing or inconsistent."""
