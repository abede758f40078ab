"""``ssltk pretrain``: the command-line face of :func:`ssltk.train.engine.pretrain`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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

    pretrain.distributed.nproc_per_node=N (and nnodes, rdzv_endpoint) runs that torchrun for you.
    """
    config = read_config(params, set_)
    with user_errors():
        from ssltk.train.distributed import torchrun_command
        from ssltk.train.rundir import default_out_dir

        args = ["--params", str(params), *(a for s in set_ or [] for a in ("--set", s))]
        args += [*(["--out", str(out)] if out is not None else []), *(["--restart"] * restart)]
        command = torchrun_command(config.pretrain.distributed, args)
    if command is not None:
        started = time.time()
        code = launch(command)
        if code not in (0, INTERRUPTED):  # torchrun says 1 for any rank's failure: say which
            code = _outcome(out or default_out_dir(config), started) or code
        raise typer.Exit(code)
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
            if main:
                fail(str(err), code=INTERRUPTED)
            raise typer.Exit(INTERRUPTED) from None
    if main:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items())
        typer.echo(
            f"pretrained {result.steps} steps ({shown}); run {result.run_id} in "
            f"{result.tracking_uri}; checkpoint {result.checkpoint}"
        )


def launch(command: list[str]) -> int:
    """Run ``command`` (torchrun) to its end; the first SIGTERM or SIGINT is passed on to it (its
    ranks then finish their step, checkpoint and stop) and the exit status is then 130."""
    # Its own session: a terminal's Ctrl-C reaches torchrun once, through this process.
    proc = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not received:
            proc.send_signal(signum)
        received.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return INTERRUPTED if received else code


def _outcome(out: Path, since: float) -> int | None:
    """The exit status the launched run's ranks meant, from the run.json rank 0 wrote after
    ``since`` (130 stopped by a signal, 3 diverged); None when there is none to read."""
    from ssltk.train.rundir import RUN_JSON, RunDir

    try:
        if (out / RUN_JSON).stat().st_mtime < since:
            return None
    except OSError:
        return None
    record = RunDir(out).read_record()
    if record.get("status") == "killed":
        return INTERRUPTED
    if record.get("status") == "failed" and "diverged" in str(record.get("failure", "")):
        return DIVERGED
    return None
