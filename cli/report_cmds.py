"""``sdlora report``: plots and a Markdown summary of one training run, or mean ± std over runs of one setting."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def report(
    runs: list[str] = typer.Argument(
        ..., help="Run directories written by 'sdlora train' (or a quoted glob such as 'runs/ir5-seed*')."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        help="Report folder, replaced as a whole (default: RUN_DIR/report for one run, report-<benchmark>-<setting "
        "hash> beside several runs, one folder per setting).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object on stdout: the files written and, for several runs, the aggregate."
    ),
) -> None:
    """One run: accuracy matrix, curve, magnitudes and time per task as PNG files plus report.md.

    Several runs (seeds of one setting): mean ± std of Acc, AAA and forgetting, one plot with every run's curve,
    report.md and aggregate.json; refused, naming the differing config keys, when the runs are not of one setting.
    Prints the table (several runs) and the paths written.
    """
    from sdlora_dist.report import write_report
    from sdlora_dist.report_runs import expand_run_args, write_aggregate_report

    aggregate = None
    expanded = expand_run_args(runs) if len(runs) == 1 else runs
    if len(expanded) == 1:
        files = write_report(expanded[0], out)
    else:
        files, table = write_aggregate_report(runs, out)
        if as_json:  # the numbers as written to aggregate.json
            aggregate = json.loads(files.data[0].read_text())
        else:
            typer.echo(table)
    if as_json:
        typer.echo(json.dumps({"files": [str(p) for p in files.paths()], "aggregate": aggregate}))
        return
    for path in files.paths():
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""
    app.command("report")(report)
