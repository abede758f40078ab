"""The ``ssltk`` command line (Typer). Every command takes ``--params`` and ``--set``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssltk import __version__
from ssltk.cliutils import (
    ParamsOption,
    SetOption,
    fail,
    progress_enabled,
    read_config,
    user_errors,
)

app = typer.Typer(
    name="ssltk",
    help="Self-supervised visual representation learning, reproducibly (Kolesnikov et al., 2019).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssltk {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """ssltk: pretext pretraining and linear evaluation, tracked in MLflow and staged in DVC."""


@app.command()
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


# Commands from other modules are registered here, each only once it does real work.

from ssltk.evaluate.command import evaluate  # noqa: E402
from ssltk.train.command import pretrain  # noqa: E402

app.command()(pretrain)
app.command("eval")(evaluate)


@app.command()
def models(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    input_size: Annotated[
        int | None, typer.Option(help="input side (default: pretext.input_size, or the patch size)")
    ] = None,
    patch_mode: Annotated[
        bool | None, typer.Option(help="patch mode (default: the task's, on for jigsaw and RPL)")
    ] = None,
) -> None:
    """Parameter counts and endpoint shapes of ``model.*``, before you train it."""
    config = read_config(params, set_)
    from ssltk.models import format_summary, model_summary
    from ssltk.pretext import task_class

    patch = task_class(config.pretext.task).patch_mode if patch_mode is None else patch_mode
    size = input_size or config.pretext.input_size
    m = config.model
    with user_errors():
        try:
            rows = model_summary(
                m.arch,
                m.widening,
                size,
                patch,
                last_relu=m.last_relu,
                representation_size=m.representation_size,
            )
        except ValueError as err:
            fail(str(err))
    mode = "patch mode, " if patch else ""
    typer.echo(f"{m.arch} k={m.widening} ({mode}{size}×{size} input)")
    typer.echo(format_summary(rows))


@app.command()
def report(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="folder for results.md/.csv and plots")] = Path(
        "reports"
    ),
) -> None:
    """Tables and plots of the study (study.*) from the tracking store: results.md, results.csv
    and PNG plots; prints the pre-logits table.
    """
    config = read_config(params, set_)
    from ssltk.report import write_report

    with user_errors():
        written = write_report(config, out)
    text = written[0].read_text(encoding="utf-8")
    start = text.index("## Pre-logits")
    typer.echo(text[start : text.index("\n## ", start + 1)].rstrip())
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


@app.command("config")
def show_config(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Print the resolved configuration (params file, overrides and schema defaults) as JSON."""
    config = read_config(params, set_)
    typer.echo(json.dumps(config.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()
