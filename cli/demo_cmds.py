"""``sdlora demo``: every stage on the bundled digits, end to end."""

from __future__ import annotations

import json

import typer


def demo(
    out: str = typer.Option("demo", "--out", help="Folder for shards, run, report, model.onnx, predictions."),
    ranks: int = typer.Option(2, "--ranks", help="Training processes (gloo on CPU, one per GPU on CUDA)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the digits recipe (repeatable)."),
) -> None:
    """Prepare digits shards, train SD-LoRA over 5 tasks on several ranks, report, export ONNX, predict, and gate the
    5-task model against the 4-task one."""
    from sdlora_dist.demo import run_demo

    result = run_demo(out, ranks=ranks, overrides=set_)
    seconds = {k: round(v, 1) for k, v in result.times.items()}
    typer.echo(json.dumps({"summary": result.summary, "gate_passed": result.gate_passed, "seconds": seconds}))


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the app."""
    app.command("demo")(demo)
