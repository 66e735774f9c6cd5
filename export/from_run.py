"""``sdlora export``: a training run directory -> merged, verified ONNX file (and optionally a Triton repository).

The export library (``onnx_export.export_onnx``) takes a plain model and a metadata dict; this module is the glue to
the run directory (``checkpoint.load_run``) and the shards (real test images for the verification).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdlora_dist.checkpoint import RunState, find_latest_run, load_run
from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.onnx_export import ExportReport, export_onnx
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


def check_not_from_another_run(out_path: str | Path, config_hash: str, run_dir: str | Path) -> None:
    """Refuse to replace an exported model whose metadata names another run's config (``--force`` skips this).

    A file that is not an sdlora ONNX export (no readable metadata) is not judged here: it is replaced as before.
    """
    import onnx

    out_path = Path(out_path)
    if not out_path.is_file():
        return
    try:
        props = {p.key: p.value for p in onnx.load(str(out_path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001  (onnx raises DecodeError and others on a file that is not ONNX)
        return
    previous = props.get("sdlora.config_hash")
    if previous is not None and previous != config_hash:
        raise UserError(
            f"{out_path} was exported from another run (config hash {previous}; run {run_dir} has {config_hash}): "
            f"pass --force to replace it, or write to another file"
        )


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
    force: bool = False,
) -> ExportReport:
    """Export the newest completed task of ``run_dir`` (default: the newest complete run under ``runs_root``).

    Verifies onnxruntime against the unmerged SD-LoRA model (so the merge is checked too) on fixed random inputs
    and on up to ``verify_images`` real test images when the run's shards are at hand.
    """
    if run_dir is None:
        run_dir = find_latest_run(runs_root)
        log_rank_zero(f"exporting {run_dir} (the newest run with a completed task under {runs_root}/)")
    state = load_run(run_dir)
    if not force:
        check_not_from_another_run(out_path, state.config_hash, run_dir)
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
    return report
