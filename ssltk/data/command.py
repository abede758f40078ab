"""``ssltk prepare``: the command-line face of :func:`ssltk.data.prepare.prepare`."""

from __future__ import annotations

from pathlib import Path

import typer

from ssltk.cliutils import ParamsOption, SetOption, progress_enabled, read_config, user_errors


def prepare(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Read ``data.*`` and write the prepared dataset under ``data.prepared_dir``."""
    config = read_config(params, set_)
    from ssltk.data.prepare import prepare as run_prepare

    with user_errors():
        manifest = run_prepare(config, progress=progress_enabled())
    counts = ", ".join(f"{name} {n}" for name, n in manifest["counts"].items())
    typer.echo(f"prepared {manifest['source']} into {config.data.prepared_dir}: {counts}")
    skipped = manifest.get("skipped_images", 0)
    if skipped:
        typer.echo(f"skipped {skipped} unreadable image(s) (data.on_bad_image=skip)", err=True)
    typer.echo(f"content hash {manifest['content_hash']}")
