"""``ssltk control``: the command-line face of :func:`ssltk.control.run.run_control`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import ParamsOption, SetOption, progress_enabled, read_config, user_errors

#: Exit code of ``--fail-on-leak`` when the task is solvable on noise.
LEAKS = 4


def control(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder for control.json (default runs/control-<task>-<arch>)"),
    ] = None,
    fail_on_leak: Annotated[
        bool, typer.Option("--fail-on-leak", help=f"exit {LEAKS} when the verdict is 'leaks'")
    ] = False,
) -> None:
    """Noise control: train the configured task briefly (control.steps) on fresh i.i.d. noise
    images and score it on noise it has not seen. Above chance = the task can be solved from
    preprocessing artifacts alone. Writes DIR/control.json.
    """
    config = read_config(params, set_)
    out = out or Path("runs") / f"control-{config.pretext.task}-{config.model.arch}"
    with user_errors():
        from ssltk.control.result import write_control
        from ssltk.control.run import run_control
        from ssltk.train.progress import Progress

        steps = config.control.steps
        progress = Progress(
            steps, 0, bar=progress_enabled(), log_every=config.pretrain.log_every, desc="control"
        )

        started = time.perf_counter()

        def on_step(step: int, values: dict[str, float]) -> None:
            progress.advance()
            rate = step * config.pretrain.batch_size / (time.perf_counter() - started)
            progress.report(step, 0, values, rate)

        result = run_control(config, on_step=on_step)
        progress.close()
        path = write_control(result, out)
    typer.echo(result.summary())
    typer.echo(f"wrote {path}")
    if result.verdict == "leaks":
        print(
            f"warning: {config.pretext.task} is solvable on noise with these settings: its "
            "features will learn the preprocessing, not the images",
            file=sys.stderr,
        )
        if fail_on_leak:
            raise typer.Exit(LEAKS)
