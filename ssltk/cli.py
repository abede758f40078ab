"""The ``ssltk`` command line (Typer): this module only assembles the commands, each of which lives
beside its domain and takes ``--params`` and ``--set``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssltk import __version__
from ssltk.cliutils import ParamsOption, SetOption, read_config
from ssltk.control.command import control
from ssltk.data.command import prepare
from ssltk.evaluate.command import evaluate
from ssltk.models_command import models
from ssltk.report.command import report
from ssltk.train.command import pretrain

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


def show_config(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Print the resolved configuration (params file, overrides and schema defaults) as JSON."""
    config = read_config(params, set_)
    typer.echo(json.dumps(config.model_dump(mode="json"), indent=2))


for name, command in (
    ("prepare", prepare),
    ("pretrain", pretrain),
    ("control", control),
    ("eval", evaluate),
    ("models", models),
    ("report", report),
    ("config", show_config),
):
    app.command(name)(command)


if __name__ == "__main__":
    app()
