"""Shared pieces of the ``ssltk`` commands: ``--params``/``--set`` and one-line user errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from ssltk import _startup
from ssltk.errors import UserError

if TYPE_CHECKING:
    from ssltk.config import Config

#: Exit code of every user error (bad params, override, path or input file, or a disk that
#: cannot take a write).
USER_ERROR = 2
#: Exit code after Ctrl-C or SIGTERM.
INTERRUPTED = 130

ParamsOption = Annotated[
    Path, typer.Option("--params", help="params file (YAML) to read", show_default=True)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override one value: dotted KEY=VALUE (repeatable)"),
]


def fail(message: str, code: int = USER_ERROR) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`UserError` (or subclass) or an ``OSError`` (a full disk, a read-only
    folder) raised inside into one line and exit code 2; Ctrl-C into one line and 130."""
    if _startup.seen:  # interrupted during start-up, and an import swallowed it
        fail("interrupted", code=INTERRUPTED)
    try:
        yield
    except UserError as err:
        fail(str(err))
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        fail(f"{where}{err.strerror or err}")
    except KeyboardInterrupt:
        fail("interrupted", code=INTERRUPTED)


def read_config(params: Path, overrides: list[str] | None) -> Config:
    """Load and validate params with overrides, exiting with one line on a user error."""
    with user_errors():  # also an interrupt during the import below is one line
        from ssltk.config import load_config  # here: listing the commands needs no schema

        return load_config(params, overrides or [])


def progress_enabled() -> bool:
    """Progress bars only where a person watches (stderr is a terminal)."""
    return sys.stderr.isatty()
