"""``ssltk report``: :func:`write_report` and its command line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ssltk.cliutils import ParamsOption, SetOption, read_config, user_errors

if TYPE_CHECKING:
    from ssltk.config import Config


def write_report(config: Config, out_dir: Path, runs_dir: Path = Path("runs")) -> list[Path]:
    """Write results.md, results.csv and the plots into ``out_dir`` and log them onto the study
    run; return the paths. The cells' runs are those ``runs_dir`` names, noise controls are read
    from ``runs_dir/*/control.json``; what could not be used is a ``warning:`` line on stderr
    (and in results.md)."""
    # Here, not at the top: the command line lists this command without importing torch.
    from ssltk.control.result import read_controls
    from ssltk.errors import UserError
    from ssltk.fsutil import write_atomic
    from ssltk.report import plots, sizes, study_run
    from ssltk.report.results import collect, provenance, rows
    from ssltk.report.tables import markdown, write_csv

    cells = collect(config, runs_dir)
    sized = (
        collect(config, runs_dir, representation_sizes=True)
        if config.study.representation_sizes
        else []
    )
    if not any(c.run for c in [*cells, *sized]):
        raise UserError(
            f"no finished pretraining run of the study under {runs_dir} in experiment "
            f"{config.tracking.experiment!r} (run the study first: dvc repro)"
        )
    for line in (line for cell in [*cells, *sized] for line in cell.warnings):
        typer.echo(f"warning: {line}", err=True)
    method = config.eval.method
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.md", out_dir / "results.csv"]
    controls = read_controls(runs_dir)
    text = markdown(cells, config, method, provenance([*cells, *sized]), controls, sized)
    write_atomic(written[0], text.encode())
    write_csv(written[1], rows(cells))
    written += plots.write_plots(cells, config, method, out_dir)
    written.append(sizes.plot(sized, method, out_dir / sizes.PLOT))
    study_run.log_report(config, [*cells, *sized], written)
    return written


def report(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="folder for results.md/.csv and plots")] = Path(
        "reports"
    ),
    runs: Annotated[
        Path, typer.Option("--runs", help="the study's run directories (runs/<cell>/run.json)")
    ] = Path("runs"),
) -> None:
    """Tables and plots of the study (study.*) from the tracking store: results.md, results.csv
    and PNG plots; prints the pre-logits table.
    """
    config = read_config(params, set_)
    with user_errors():
        written = write_report(config, out, runs)
    text = written[0].read_text(encoding="utf-8")
    start = text.index("## Pre-logits")
    typer.echo(text[start : text.index("\n## ", start + 1)].rstrip())
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")
