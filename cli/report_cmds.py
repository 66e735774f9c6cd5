"""``sdlora report``: plots and a Markdown summary of a training run."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    run_dir: Path = typer.Argument(..., help="Run directory written by 'sdlora train' (holds metrics.json)."),
    out: Path = typer.Option(None, "--out", help="Report folder (default: RUN_DIR/report); replaced as a whole."),
) -> None:
    """Accuracy matrix, accuracy curve, magnitudes and time per task as PNG files, plus report.md; prints the paths."""
    from sdlora_dist.report import write_report

    files = write_report(run_dir, out)
    for path in files.paths():
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""
    app.command("report")(report)
