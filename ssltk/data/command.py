"""``ssltk prepare``: the command-line face of :func:`ssltk.data.prepare.prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import (
    ParamsOption,
    SetOption,
    fail,
    progress_enabled,
    read_config,
    user_errors,
)

TransferOption = Annotated[
    str | None,
    typer.Option(
        "--transfer",
        help="prepare the dataset study.transfer.NAME names (its keys over data.*) instead",
    ),
]


def prepare(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    transfer: TransferOption = None,
) -> None:
    """Read ``data.*`` and write the prepared dataset under ``data.prepared_dir``."""
    config = read_config(params, set_)
    if transfer is not None:
        if transfer not in config.study.transfer:
            known = ", ".join(config.study.transfer) or "none"
            fail(f"--transfer {transfer}: study.transfer has no dataset {transfer!r} (has {known})")
        given = config.study.transfer[transfer]
        data = config.data.model_copy(
            update={name: getattr(given, name) for name in given.model_fields_set}
        )
        config = config.model_copy(update={"data": data})
    from ssltk.data.prepare import prepare as run_prepare

    with user_errors():
        manifest = run_prepare(config, progress=progress_enabled())
    counts = ", ".join(f"{name} {n}" for name, n in manifest["counts"].items())
    typer.echo(f"prepared {manifest['source']} into {config.data.prepared_dir}: {counts}")
    skipped = manifest.get("skipped_images", 0)
    if skipped:
        typer.echo(f"skipped {skipped} unreadable image(s) (data.on_bad_image=skip)", err=True)
    typer.echo(f"content hash {manifest['content_hash']}")
