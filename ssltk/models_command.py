"""``ssltk models``: parameter counts and endpoint shapes of ``model.*``.

Outside :mod:`ssltk.models` so that the command line can list it without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import ParamsOption, SetOption, fail, read_config, user_errors


def models(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    input_size: Annotated[
        int | None, typer.Option(help="input side (default: pretext.input_size, or the patch size)")
    ] = None,
    patch_mode: Annotated[
        bool | None, typer.Option(help="patch mode (default: the task's, on for patch tasks)")
    ] = None,
) -> None:
    """Parameter counts and endpoint shapes of ``model.*``, before you train it."""
    config = read_config(params, set_)
    from ssltk.models import ArchConfig
    from ssltk.models.summary import format_summary, summarize
    from ssltk.pretext import task_class

    patch = task_class(config.pretext.task).patch_mode if patch_mode is None else patch_mode
    size = input_size or config.pretext.input_size
    m = config.model
    with user_errors():
        try:
            arch = ArchConfig.from_model(m, num_classes=1000, patch_mode=patch, input_size=size)
            rows = summarize(arch)
        except ValueError as err:
            fail(str(err))
    mode = "patch mode, " if patch else ""
    typer.echo(f"{m.arch} k={m.widening} ({mode}{size}×{size} input)")
    typer.echo(format_summary(rows))
