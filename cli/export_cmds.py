"""``sdlora export``, ``sdlora predict``, ``sdlora evaluate``: the merged model as ONNX, and onnxruntime serving."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sdlora_dist.errors import UserError


def export(
    out: Path = typer.Argument(
        ..., help="Output .onnx file (written atomically after verification), or folder with --format timm."
    ),
    run: Path = typer.Option(None, "--run", help="Run directory; default: the newest complete run under --runs-root."),
    runs_root: Path = typer.Option(
        Path("runs"), "--runs-root", envvar="SDLORA_RUNS_ROOT", help="Where to look for runs when --run is omitted."
    ),
    task: int = typer.Option(None, "--task", help="Export the model after this task (default: the newest)."),
    parent: Path = typer.Option(None, "--parent", help="The .onnx this model replaces (lineage; default: recorded)."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision weights and compute (GPU serving); fp32 I/O."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (17-23)."),
    with_preprocessing: bool = typer.Option(
        False, "--with-preprocessing", help="Take uint8 NHWC images and normalise inside the graph."
    ),
    verify_images: int = typer.Option(64, "--verify-images", help="Real test images to verify on (0 = random only)."),
    triton: Path = typer.Option(None, "--triton", help="Also write a Triton model repository entry here."),
    triton_name: str = typer.Option(None, "--triton-name", help="Triton model name (default: OUT's stem)."),
    triton_max_batch: int = typer.Option(64, "--triton-max-batch", help="Triton max_batch_size."),
    force: bool = typer.Option(False, "--force", help="Replace OUT even when its metadata names another run."),
    format_: str = typer.Option(
        "onnx", "--format", help="onnx (OUT: a .onnx file) or timm (OUT: a folder, model.safetensors + config.json)."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="Also write OUT_STEM.int8.onnx (dynamic quantization), kept only if verified."
    ),
) -> None:
    """Export the merged model of a run (after its newest task, or --task K) as one ONNX file with its lineage,
    verified against PyTorch with onnxruntime (or, with --format timm, as a folder timm loads); a model card is
    written beside it."""
    from sdlora_dist.checkpoint import find_latest_run
    from sdlora_dist.export.from_run import export_run, export_timm_run

    if format_ not in ("onnx", "timm"):
        raise UserError(f"--format must be onnx or timm (got {format_!r})")
    if format_ == "timm" and (int8 or fp16 or triton or parent):
        raise UserError(
            "--int8, --fp16, --triton and --parent apply to --format onnx only; drop them for --format timm"
        )
    if int8 and fp16:
        raise UserError("--int8 quantizes the fp32 model: drop --fp16")
    if run is None:
        run = find_latest_run(runs_root)
        typer.echo(f"run: {run} (the newest run with a completed task under {runs_root}/; --run picks another)")
    if format_ == "timm":
        folder = export_timm_run(out, run_dir=run, task=task)
        typer.echo(f"wrote {folder} (model.safetensors, config.json, README.md): "
                   f"timm.create_model('local-dir:{folder}', pretrained=True)")  # fmt: skip
        return
    report = export_run(
        out,
        run_dir=run,
        task=task,
        parent=parent,
        opset=opset,
        fp16=fp16,
        with_preprocessing=with_preprocessing,
        verify_images=verify_images,
        triton_dir=triton,
        triton_name=triton_name,
        triton_max_batch=triton_max_batch,
        force=force,
        int8=int8,
    )
    typer.echo(report.summary())


def predict(
    model: Path = typer.Argument(..., help="An .onnx file written by 'sdlora export'."),
    images: list[str] = typer.Argument(..., help="Image files."),
    top_k: int = typer.Option(5, "--top-k", help="Classes to print per image."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per onnxruntime call."),
    provider: str = typer.Option(
        None, "--provider", envvar="SDLORA_PROVIDER", help="cuda, tensorrt or cpu (default: CUDA when installed)."
    ),
) -> None:
    """Classify images with onnxruntime: one JSON line per image on stdout; unreadable files reported on stderr."""
    from sdlora_dist.export.inference import run_predict

    failed = run_predict(model, images, top_k=top_k, batch_size=batch_size, provider=provider)
    if failed:
        raise UserError(f"{failed} of {len(images)} files could not be predicted (see the lines above)")


def evaluate(
    model: Path = typer.Argument(..., help="An .onnx file written by 'sdlora export'."),
    data: str = typer.Option(..., "--data", help="Shard set (from 'sdlora data prepare'): a folder or URL."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per onnxruntime call."),
    provider: str = typer.Option(
        None, "--provider", envvar="SDLORA_PROVIDER", help="cuda, tensorrt or cpu (default: CUDA when installed)."
    ),
) -> None:
    """Accuracy of an exported model on the test shards of every task it has seen (JSON on stdout)."""
    from sdlora_dist.export.evaluate import evaluate_onnx

    result = evaluate_onnx(model, data, batch_size=batch_size, provider=provider)
    typer.echo(json.dumps(result.to_dict()))


def register(app: typer.Typer) -> None:
    """Add ``export``, ``predict`` and ``evaluate`` to the app."""
    app.command("export")(export)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)
