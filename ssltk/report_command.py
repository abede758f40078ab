"""``ssltk report``: the command-line face of :func:`ssltk.report.write_report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssltk.cliutils import ParamsOption, SetOption, read_config, user_errors


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
