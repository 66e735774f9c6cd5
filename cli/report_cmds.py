"""``sdlora report``: plots and a Markdown summary of one training run, or mean ± std over runs of one setting."""

from __future__ import annotations

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
) -> None:
    """One run: accuracy matrix, curve, magnitudes and time per task as PNG files plus report.md.

    Several runs (seeds of one setting): mean ± std of Acc, AAA and forgetting, one plot with every run's curve,
    report.md and aggregate.json; refused, naming the differing config keys, when the runs are not of one setting.
    Prints the table (several runs) and the paths written.
    """
    from sdlora_dist.report import write_report
    from sdlora_dist.report_runs import expand_run_args, write_aggregate_report

    if len(runs) == 1 and len(expand_run_args(runs)) == 1:
        files = write_report(expand_run_args(runs)[0], out)
    else:
        files, table = write_aggregate_report(runs, out)
        typer.echo(table)
    for path in files.paths():
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""
    app.command("report")(report)
