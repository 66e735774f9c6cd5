"""``sdlora inspect``, ``sdlora gate``, ``sdlora publish``, ``sdlora rollback``: a model's lineage, the check before
it ships, and publishing it as a numbered version (Triton model repository, MLflow model registry)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sdlora_dist.errors import UserError


def inspect(model: Path = typer.Argument(..., help="An .onnx file written by 'sdlora export'.")) -> None:
    """Print a model's metadata and lineage: run, task, data, class split, parent, training-time accuracy."""
    from sdlora_dist.export.lineage import describe, read_lineage
    from sdlora_dist.export.metadata import read_metadata
    from sdlora_dist.fileio import file_sha256

    meta = read_metadata(model)
    typer.echo(describe(meta, read_lineage(meta, str(model)), str(model), file_sha256(model)))


def gate(
    new: Path = typer.Argument(..., help="The candidate .onnx (e.g. after the new task)."),
    baseline: Path = typer.Option(..., "--baseline", help="The .onnx in production that NEW would replace."),
    data: str = typer.Option(..., "--data", help="Shard set holding the test images of every class of both models."),
    max_drop: float = typer.Option(2.0, "--max-drop", help="Max points of accuracy the old classes may lose."),
    max_class_drop: float = typer.Option(10.0, "--max-class-drop", help="Max points any single old class may lose."),
    report: Path = typer.Option(Path("gate_report.json"), "--report", help="Where to write the JSON report."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per onnxruntime call."),
    provider: str = typer.Option(None, "--provider", help="cuda, tensorrt or cpu (default: CUDA when installed)."),
) -> None:
    """Evaluate NEW and the baseline with onnxruntime; exit 0 if NEW may ship, 3 if it fails, 2 on wrong input."""
    from sdlora_dist.export.gate import GATE_FAILED, run_gate
    from sdlora_dist.fileio import atomic_write_json

    result = run_gate(new, baseline, data, max_drop=max_drop, max_class_drop=max_class_drop,
                      batch_size=batch_size, provider=provider)  # fmt: skip
    atomic_write_json(report, result.to_dict())
    typer.echo(result.table())
    typer.echo(f"report: {report}")
    if not result.passed:
        raise typer.Exit(GATE_FAILED)


def publish(
    model: Path = typer.Argument(..., help="An .onnx file written by 'sdlora export'."),
    triton: Path = typer.Option(None, "--triton", help="Triton model repository: adds the next version."),
    name: str = typer.Option(None, "--name", help="Model name (Triton folder / MLflow registered model)."),
    triton_max_batch: int = typer.Option(64, "--triton-max-batch", help="Triton max_batch_size."),
    mlflow_uri: str = typer.Option(None, "--mlflow-uri", help="MLflow tracking server: registers a model version."),
    gate_report: Path = typer.Option(
        None, "--gate-report", help="The gate's JSON report for MODEL: MLflow alias 'champion' only when it passed."
    ),
) -> None:
    """Publish MODEL as a new numbered version (never overwriting one) in a Triton repository and/or MLflow."""
    if triton is None and mlflow_uri is None:
        raise UserError("publish needs a destination: --triton REPO and/or --mlflow-uri URI")
    if triton is not None:
        from sdlora_dist.export.triton import publish_triton

        done = publish_triton(model, triton, model_name=name, max_batch_size=triton_max_batch)
        state = "published" if done.new else "already published"
        typer.echo(f"triton: {state} {model} as version {done.version} of {done.folder} (serving the newest)")
    if mlflow_uri is not None:
        from sdlora_dist.export.registry import register_mlflow

        version = register_mlflow(model, mlflow_uri, name=name or model.stem, gate_report=gate_report)
        typer.echo(json.dumps(version))


def rollback(
    triton: Path = typer.Option(..., "--triton", help="Triton model repository."),
    name: str = typer.Option(..., "--name", help="Model name (the folder under the repository)."),
    version: int = typer.Option(None, "--version", help="Serve this published version."),
    latest: bool = typer.Option(False, "--latest", help="Serve the newest version again (undo a rollback)."),
) -> None:
    """Point the Triton model's version_policy at an earlier version (files untouched), or back at the newest."""
    from sdlora_dist.export.triton import rollback as do_rollback

    if (version is None) == (not latest):
        raise UserError("rollback needs exactly one of --version V or --latest")
    served = do_rollback(triton, name, None if latest else version)
    typer.echo(f"triton: {triton / name} now serves version {served}")


def register(app: typer.Typer) -> None:
    """Add ``inspect``, ``gate``, ``publish`` and ``rollback`` to the app."""
    app.command("inspect")(inspect)
    app.command("gate")(gate)
    app.command("publish")(publish)
    app.command("rollback")(rollback)
