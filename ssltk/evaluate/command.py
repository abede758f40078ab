"""``ssltk eval``: linear evaluation of a pretraining run, or of a random init (``--baseline``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import ParamsOption, SetOption, fail, read_config, user_errors

RunIdOption = Annotated[
    str | None, typer.Option("--run-id", help="MLflow id of the pretraining run to evaluate")
]
RunDirOption = Annotated[
    Path | None,
    typer.Option("--run-dir", help="pretraining run directory (its run.json names the run)"),
]
BaselineOption = Annotated[
    bool,
    typer.Option(
        "--baseline", help="evaluate a randomly initialised network of the configured cell"
    ),
]
UnfinishedOption = Annotated[
    bool,
    typer.Option(
        "--unfinished",
        help="also evaluate a run that did not finish (its latest checkpoint); the figures stay "
        "on the eval run, tagged, and never reach the pretraining run or the report",
    ),
]
TransferOption = Annotated[
    str | None,
    typer.Option(
        "--transfer",
        help="evaluate on the dataset study.transfer.NAME names (as --set eval.data.KEY=... "
        "with each of its keys)",
    ),
]
EvalOutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="where metrics.json and the feature cache go (default: RUN_DIR/eval, "
        "runs/baseline-<cell>, or runs/eval-<run id>; with -data-<hash16> after it on another "
        "dataset than the run's own)",
    ),
]


def evaluate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    run_id: RunIdOption = None,
    run_dir: RunDirOption = None,
    baseline: BaselineOption = False,
    out: EvalOutOption = None,
    unfinished: UnfinishedOption = False,
    transfer: TransferOption = None,
) -> None:
    """Linear evaluation: probe every layer in eval.layers with eval.method.

    Give exactly one of --run-id, --run-dir or --baseline. Only a finished run is evaluated
    unless --unfinished.

    A pretraining run is rebuilt from its own logged config and checkpoint; the figures
    probe/<method>/top1/<layer> (and top5) go to a new eval run and back onto the pretraining run.
    On another dataset (eval.data, --transfer) the figures end in /data-<hash16>.
    """
    chosen = [
        name
        for name, given in (("--run-id", run_id), ("--run-dir", run_dir), ("--baseline", baseline))
        if given
    ]
    if len(chosen) != 1:
        fail(
            "give exactly one of --run-id, --run-dir or --baseline"
            + (f" (got {' and '.join(chosen)})" if chosen else "")
        )
    config = read_config(params, set_)
    if transfer is not None:
        config = _with_transfer(config, transfer)
    from ssltk import tracking
    from ssltk.evaluate.evaluation import evaluate as run_evaluation
    from ssltk.evaluate.evaluation import evaluation_data
    from ssltk.evaluate.target import baseline_target, target_from_run_dir, target_from_run_id

    device = _device(config.eval.device)
    with user_errors(), tempfile.TemporaryDirectory() as scratch:
        if baseline:
            target = baseline_target(config)
            default_out = Path("runs") / f"baseline-{tracking.run_name(config)}"
        elif run_dir is not None:
            target = target_from_run_dir(config, run_dir, allow_unfinished=unfinished)
            default_out = run_dir / "eval"
        else:
            target = target_from_run_id(config, run_id, Path(scratch), allow_unfinished=unfinished)
            default_out = Path("runs") / f"eval-{run_id}"
        data = evaluation_data(target)
        if data.key is not None:
            default_out = default_out.with_name(f"{default_out.name}-{data.key}")
        result = run_evaluation(target, out or default_out, device=device, data=data)
    best = max(result.layers, key=lambda layer: result.layers[layer]["top1"])
    shown = ", ".join(f"{layer} {figures['top1']:.4f}" for layer, figures in result.layers.items())
    on = f" of {data.key} ({data.config.data.prepared_dir})" if data.key else ""
    typer.echo(
        f"{target.kind} {target.name}: {result.method} top-1 on {result.split}{on}: {shown} "
        f"(best {best}); run {result.run_id}"
        + (f" ({target.unfinished}: kept off the pretraining run)" if target.unfinished else "")
    )


def _with_transfer(config, name: str):
    """``config`` evaluating on ``study.transfer[name]``."""
    if name not in config.study.transfer:
        known = ", ".join(config.study.transfer) or "none"
        fail(f"--transfer {name}: study.transfer has no dataset {name!r} (has {known})")
    data = config.study.transfer[name]
    return config.model_copy(update={"eval": config.eval.model_copy(update={"data": data})})


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        fail("eval.device=cuda but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
