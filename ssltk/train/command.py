"""``ssltk pretrain``: the command-line face of :func:`ssltk.train.engine.pretrain`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import (
    INTERRUPTED,
    ParamsOption,
    SetOption,
    fail,
    progress_enabled,
    read_config,
    user_errors,
)

#: Exit code of a run stopped by a NaN/inf loss.
DIVERGED = 3

OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="run directory (default runs/<task>-<arch>-w<widening>)"),
]
RestartOption = Annotated[
    bool,
    typer.Option("--restart", help="delete the run directory's checkpoints and start over"),
]


def pretrain(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    out: OutOption = None,
    restart: RestartOption = False,
) -> None:
    """Pretrain one (task, arch, widening); log it to MLflow; write DIR/run.json and metrics.json.

    Resumes from the newest valid checkpoint in DIR/checkpoints unless --restart.

    Under `torchrun --nproc-per-node N -m ssltk pretrain`, each process takes 1/N of each batch.

    Gradients are averaged: an update equals the one-process update on the global batch.

    BatchNorm sees the global batch with pretrain.distributed.sync_bn=true, else each process's.
    """
    config = read_config(params, set_)
    main = int(os.environ.get("RANK", "0")) == 0
    with user_errors():
        from ssltk.train.engine import DivergenceError, RunInterrupted  # seconds: Ctrl-C-able
        from ssltk.train.engine import pretrain as run_pretrain

        try:
            result = run_pretrain(config, out, restart=restart, progress_bar=progress_enabled())
        except DivergenceError as err:
            if main:
                fail(str(err), code=DIVERGED)
            raise typer.Exit(DIVERGED) from None
        except RunInterrupted as err:
            fail(str(err), code=INTERRUPTED)
    if main:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items())
        typer.echo(
            f"pretrained {result.steps} steps ({shown}); run {result.run_id} in "
            f"{result.tracking_uri}; checkpoint {result.checkpoint}"
        )
