"""``sdlora export``: a training run directory -> merged, verified ONNX file (and optionally a Triton repository).

The export library (``onnx_export.export_onnx``) takes a plain model and a metadata dict; this module is the glue to
the run directory (``checkpoint.load_run``) and the shards (real test images for the verification).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdlora_dist.checkpoint import RunState, find_latest_run, load_run
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.model_card import write_card
from sdlora_dist.export.onnx_export import ExportReport, export_onnx
from sdlora_dist.export.timm_format import CONFIG_FILE, WEIGHTS_FILE, write_timm_folder
from sdlora_dist.export.triton import write_triton_repo
from sdlora_dist.logs import log_rank_zero
from sdlora_dist.preprocess import describe_weights, transform_spec


def run_metadata(state: RunState) -> dict[str, Any]:
    """The ``metadata=`` dict of ``export_onnx`` for a loaded run."""
    # The training recipe's own eval preprocessing (data.normalize, data.eval_crop_pct): one source of truth.
    spec = transform_spec(state.model, state.config.data)
    pretrained = {**state.model.pretrained_cfg, "interpolation": spec.interpolation}
    metadata = metadata_from_pretrained_cfg(
        pretrained,
        class_names=state.class_names,
        num_tasks=state.model.num_tasks,
        config_hash=state.config_hash,
        crop_pct=spec.crop_pct,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
    )
    weights = state.info.get("weights")
    if weights:
        metadata["weights"] = describe_weights(weights).removeprefix("weights: ")
    return metadata


def real_test_images(shards_dir: str | Path, metadata: dict[str, Any], *, tasks: int, limit: int) -> np.ndarray:
    """Up to ``limit`` test images of the first ``tasks`` tasks as uint8 (N, H, W, 3) crops (eval preprocessing).

    The loader normalises with mean 0 and std 1/255, which turns its [0, 1] floats back into exact pixel values.
    """
    from sdlora_dist.data import TransformSpec, make_eval_loader
    from sdlora_dist.data.manifest import load_manifest

    manifest = load_manifest(shards_dir)
    per_task = max(1, limit // max(1, tasks))
    spec = TransformSpec(
        img_size=int(metadata["input_size"][1]),
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255,) * 3,
        interpolation=metadata["interpolation"],
        crop_pct=float(metadata["crop_pct"]),
    )
    crops: list[np.ndarray] = []
    for task in range(min(tasks, manifest.num_tasks())):
        for images, _ in make_eval_loader(shards_dir, [task], spec=spec, batch_size=per_task):
            pixels = images.numpy().round().clip(0, 255).astype(np.uint8)  # (B, 3, H, W)
            crops.append(pixels.transpose(0, 2, 3, 1))  # -> (B, H, W, 3)
            break
    return np.concatenate(crops)[:limit] if crops else np.zeros((0, 1, 1, 3), np.uint8)


def export_run(
    out_path: str | Path,
    *,
    run_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    opset: int = 17,
    fp16: bool = False,
    with_preprocessing: bool = False,
    verify_images: int = 64,
    triton_dir: str | Path | None = None,
    triton_name: str | None = None,
    triton_max_batch: int = 64,
    int8: bool = False,
    int8_images: int = 1000,
) -> ExportReport:
    """Export the newest completed task of ``run_dir`` (default: the newest complete run under ``runs_root``).

    Verifies onnxruntime against the unmerged SD-LoRA model (so the merge is checked too) on fixed random inputs
    and on up to ``verify_images`` real test images when the run's shards are at hand.
    """
    if run_dir is None:
        run_dir = find_latest_run(runs_root)
        log_rank_zero(f"exporting {run_dir} (the newest run with a completed task under {runs_root}/)")
    state = load_run(run_dir)
    metadata = run_metadata(state)
    images = None
    if verify_images > 0 and state.shards and Path(state.shards).is_dir():
        images = real_test_images(state.shards, metadata, tasks=state.model.num_tasks, limit=verify_images)
    elif verify_images > 0:
        log_rank_zero(f"shards {state.shards!r} of the run are not at hand: verifying on random inputs only")
    merged = state.model.merge()
    report = export_onnx(
        merged,
        out_path,
        metadata=metadata,
        opset=opset,
        fp16=fp16,
        with_preprocessing=with_preprocessing,
        verify_inputs=images,
        reference=state.model,
    )
    if triton_dir is not None:
        folder = write_triton_repo(report.path, triton_dir, model_name=triton_name, max_batch_size=triton_max_batch)
        log_rank_zero(f"wrote Triton model repository entry {folder}")
    files = {f"ONNX model, {report.precision}, input {report.input_layout}": report.path.name}
    if int8:
        from sdlora_dist.export.quantize import quantize_int8

        all_images = real_test_images(state.shards, metadata, tasks=state.model.num_tasks, limit=int8_images) if (
            state.shards and Path(state.shards).is_dir()) else np.zeros((0, 1, 1, 3), np.uint8)  # fmt: skip
        quantized = quantize_int8(report.path, all_images)
        log_rank_zero(quantized.summary())
        files["ONNX model, INT8 dynamic quantization (CPU serving)"] = quantized.path.name
    card = write_card(report.path, state, metadata, files)
    log_rank_zero(f"wrote model card {card}")
    return report


def export_timm_run(out_dir: str | Path, *, run_dir: str | Path | None = None,
                    runs_root: str | Path = "runs") -> Path:  # fmt: skip
    """``--format timm``: the merged model of the run as a timm folder (model.safetensors, config.json) plus its
    model card README.md."""
    if run_dir is None:
        run_dir = find_latest_run(runs_root)
        log_rank_zero(f"exporting {run_dir} (the newest run with a completed task under {runs_root}/)")
    state = load_run(run_dir)
    metadata = run_metadata(state)
    folder = write_timm_folder(out_dir, state, metadata)
    files = {"merged timm ViT weights (safetensors)": WEIGHTS_FILE, "timm config (architecture, classes, "
             "preprocessing)": CONFIG_FILE}  # fmt: skip
    write_card(folder, state, metadata, files)
    return folder
