"""``sdlora export``: a training run directory -> merged, verified ONNX file (and optionally a Triton repository).

Any completed task can be exported (``--task K``): the per-task checkpoints rebuild the model exactly as it was. The
file's ``sdlora.lineage`` (``lineage.py``) is assembled here from run.json, the task's progress.json and
RUN_DIR/exports.json (the sha256 of each task's newest export, so the next export names its parent).

The export library (``onnx_export.export_onnx``) takes a plain model and a metadata dict; this module is the glue to
the run directory (``checkpoint.load_run``) and the shards (real test images for the verification).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sdlora_dist.checkpoint import RunState, load_progress, load_run
from sdlora_dist.data.classes import split_fingerprint
from sdlora_dist.errors import UserError
from sdlora_dist.export.lineage import Lineage
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg, read_props
from sdlora_dist.export.model_card import write_card
from sdlora_dist.export.onnx_export import ExportReport, export_onnx
from sdlora_dist.export.timm_format import CONFIG_FILE, WEIGHTS_FILE, write_timm_folder
from sdlora_dist.export.triton import write_triton_repo
from sdlora_dist.fileio import atomic_write_json, file_sha256
from sdlora_dist.logs import log_rank_zero
from sdlora_dist.preprocess import describe_weights, transform_spec

EXPORTS_FILE = "exports.json"  # RUN_DIR/exports.json: task -> sha256 and path of its newest export (parent links)


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


def _test_accuracy(state: RunState, task: int) -> dict[str, Any] | None:
    """The run's own evaluation after ``task`` (None when its progress file holds no accuracy row)."""
    try:
        log = load_progress(state.run_dir, task).log
    except (UserError, KeyError, TypeError):  # runs written by tools that keep no record (tests, old runs)
        return None
    if log.num_tasks != task + 1:
        return None
    correct, totals = log.correct[-1], log.totals[: task + 1]
    return {
        "per_task": [round(v, 4) for v in log.matrix()[-1]],
        "correct": correct,
        "totals": totals,
        "top1": round(log.top1_curve()[-1], 4),
    }


def _task_classes(state: RunState) -> tuple[list[list[str]], str]:
    """Class names per task of the loaded model, and how the run chose the order."""
    split = state.info.get("task_split")
    counts = list(state.model.task_classes)
    if split:
        return [list(t) for t in split["task_classes"][: len(counts)]], str(split.get("class_order_from", ""))
    offsets = [sum(counts[:t]) for t in range(len(counts) + 1)]  # runs from before the split was recorded
    return [state.class_names[offsets[t] : offsets[t + 1]] for t in range(len(counts))], "the shard set's"


def _data_fingerprint(state: RunState) -> str:
    """The fingerprint recorded in run.json; for older runs, the manifest's when the shards are at hand."""
    if state.info.get("data_fingerprint"):
        return str(state.info["data_fingerprint"])
    if state.shards and Path(state.shards).is_dir():
        from sdlora_dist.data.manifest import load_manifest

        return load_manifest(state.shards).fingerprint
    return ""


def parent_of(run_dir: Path, task: int) -> str | None:
    """sha256 of the newest export of the nearest earlier task of the run (None when none was recorded)."""
    path = run_dir / EXPORTS_FILE
    if not path.is_file():
        return None
    exports = json.loads(path.read_text())
    earlier = sorted((int(t) for t in exports if int(t) < task), reverse=True)
    return exports[str(earlier[0])]["sha256"] if earlier else None


def record_export(run_dir: Path, task: int, onnx_path: Path) -> None:
    """Note in RUN_DIR/exports.json that ``onnx_path`` is task ``task``'s newest export (the next task's parent)."""
    path = run_dir / EXPORTS_FILE
    exports = json.loads(path.read_text()) if path.is_file() else {}
    exports[str(task)] = {"sha256": file_sha256(onnx_path), "path": str(onnx_path.absolute())}
    try:
        atomic_write_json(path, exports)
    except OSError:  # a read-only run directory still exports; the next export just has no parent link
        pass


def run_lineage(state: RunState, task: int, *, parent_sha256: str | None) -> Lineage:
    """The lineage of the model after ``task`` of the loaded run."""
    task_classes, order_from = _task_classes(state)
    return Lineage(
        run_id=state.run_dir.absolute().name,
        task=task,
        num_tasks=task + 1,
        run_tasks_done=state.num_tasks_done,
        benchmark=str(state.info.get("benchmark", "")),
        data_fingerprint=_data_fingerprint(state),
        class_order_from=order_from,
        task_classes=task_classes,
        split_fingerprint=split_fingerprint(task_classes),
        config_hash=state.config_hash,
        parent_sha256=parent_sha256,
        test_accuracy=_test_accuracy(state, task),
    )


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
    out_path = Path(out_path)
    if not out_path.is_file():
        return
    try:
        props = read_props(out_path)
    except UserError:  # not ONNX at all
        return
    previous = props.get("sdlora.config_hash")
    if previous is not None and previous != config_hash:
        raise UserError(
            f"{out_path} was exported from another run (config hash {previous}; run {run_dir} has {config_hash}): "
            f"pass --force to replace it, or write to another file"
        )


def resolve_parent(state: RunState, task: int, parent: str | Path | None) -> str | None:
    """sha256 of ``parent`` (an .onnx file) when given, else of the run's recorded export of an earlier task."""
    if parent is None:
        return parent_of(state.run_dir, task)
    parent = Path(parent)
    if not parent.is_file():
        raise UserError(f"--parent {parent} does not exist: pass the .onnx file this model replaces")
    return file_sha256(parent)


def export_run(
    out_path: str | Path,
    *,
    run_dir: str | Path,
    task: int | None = None,
    parent: str | Path | None = None,
    opset: int = 17,
    fp16: bool = False,
    with_preprocessing: bool = False,
    verify_images: int = 64,
    triton_dir: str | Path | None = None,
    triton_name: str | None = None,
    triton_max_batch: int = 64,
    force: bool = False,
    int8: bool = False,
    int8_images: int = 1000,
) -> ExportReport:
    """Export the model after ``task`` (default: the newest completed task) of ``run_dir``, with its lineage in the
    metadata (``sdlora export`` picks the newest run under ``--runs-root`` when ``--run`` is omitted).

    The model is rebuilt from the per-task checkpoints, so a task exported after later tasks were trained equals its
    export made at the time. ``parent``: the file this model replaces (default: the run's newest export of an
    earlier task, from RUN_DIR/exports.json). Verifies onnxruntime against the unmerged SD-LoRA model (so the merge
    is checked too) on fixed random inputs and on up to ``verify_images`` real test images when the shards are at
    hand.
    """
    state = load_run(run_dir, task)
    task = state.model.num_tasks - 1
    if not force:
        check_not_from_another_run(out_path, state.config_hash, run_dir)
    metadata = run_metadata(state)
    metadata["lineage"] = run_lineage(state, task, parent_sha256=resolve_parent(state, task, parent)).to_json()
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
    record_export(state.run_dir, task, report.path)
    if triton_dir is not None:
        folder = write_triton_repo(report.path, triton_dir, model_name=triton_name, max_batch_size=triton_max_batch)
        log_rank_zero(f"published {folder} in the Triton model repository")
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


def export_timm_run(out_dir: str | Path, *, run_dir: str | Path, task: int | None = None) -> Path:
    """``--format timm``: the merged model of the run after ``task`` (default: the newest) as a timm folder
    (model.safetensors, config.json) plus its model card README.md."""
    state = load_run(run_dir, task)
    metadata = run_metadata(state)
    folder = write_timm_folder(out_dir, state, metadata)
    files = {"merged timm ViT weights (safetensors)": WEIGHTS_FILE, "timm config (architecture, classes, "
             "preprocessing)": CONFIG_FILE}  # fmt: skip
    write_card(folder, state, metadata, files)
    return folder
