"""``sdlora evaluate MODEL.onnx --data SHARDS``: accuracy of the exported file on the test shards, per task.

Preprocessing comes from the file's metadata and runs through the data pipeline's eval transform (the one training
evaluated with), so the counts are comparable with the PyTorch evaluation of the run. A file with lineage
(``lineage.py``) is evaluated on the shards the way its run read them: its own class order and task split, each
class found by name, after checking the shard set's fingerprint; older files need the shards' default order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdlora_dist.errors import UserError
from sdlora_dist.export.inference import OnnxClassifier
from sdlora_dist.export.lineage import check_shards, model_view, read_lineage
from sdlora_dist.export.metadata import LAYOUT_UINT8, ModelMetadata
from sdlora_dist.logs import log_rank_zero, progress_bar

if TYPE_CHECKING:
    from sdlora_dist.data.manifest import Manifest


@dataclass
class EvalResult:
    """Correct and total counts, per task and overall."""

    correct: int = 0
    total: int = 0
    per_task: dict[int, tuple[int, int]] = field(default_factory=dict)  # task -> (correct, total)
    per_class: dict[int, tuple[int, int]] = field(default_factory=dict)  # label -> (correct, total)
    skipped: int = 0  # corrupt samples the loader skipped

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy over all evaluated samples."""
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "correct": self.correct,
            "total": self.total,
            "accuracy": round(self.accuracy, 6),
            "per_task": {str(t): {"correct": c, "total": n} for t, (c, n) in sorted(self.per_task.items())},
            "skipped_corrupt": self.skipped,
        }


def _check_shards_match(meta: ModelMetadata, class_names: list[str], shards_dir: str) -> None:
    seen = class_names[: meta.num_classes]
    if len(seen) < meta.num_classes or list(meta.class_names) != seen:
        raise UserError(
            f"the shards in {shards_dir} do not match the model: its {meta.num_classes} classes start "
            f"{list(meta.class_names[:3])}, the shards' class order starts {class_names[:3]}; pass the shard set "
            "the model was trained on"
        )


def evaluate_onnx(
    model_path: str | Path,
    shards_dir: str | Path,
    *,
    batch_size: int = 64,
    provider: str | None = None,
    tasks: list[int] | None = None,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
) -> EvalResult:
    """Top-1 correct counts of the ONNX model on the test shards of ``tasks`` (default: every task it has seen).

    ``shards_dir`` is a folder or any URL the data pipeline streams from (``sdlora_dist.data.urls``).
    """
    from sdlora_dist.data import TransformSpec, make_eval_loader

    classifier = OnnxClassifier(model_path, provider=provider)
    log_rank_zero(classifier.describe_provider())
    meta = classifier.metadata
    manifest = _model_manifest(meta, shards_dir, str(model_path))
    tasks = list(range(min(meta.num_tasks, manifest.num_tasks()))) if tasks is None else tasks
    uint8 = meta.input_layout == LAYOUT_UINT8
    # A uint8 model takes raw pixels: mean 0, std 1/255 makes the loader return the pixel values themselves.
    mean, std = ((0.0, 0.0, 0.0), (1 / 255,) * 3) if uint8 else (meta.mean, meta.std)
    spec = TransformSpec(meta.image_hw[0], mean, std, interpolation=meta.interpolation, crop_pct=meta.crop_pct)
    result = EvalResult()
    for task in tasks:
        loader = make_eval_loader(
            shards_dir, [task], spec=spec, batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
            manifest=manifest,
        )  # fmt: skip
        for images, labels in progress_bar(loader, desc=f"evaluate task {task}"):
            x = images.numpy()
            if uint8:
                x = np.ascontiguousarray(x.round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
            _count(result, task, classifier.run(x).argmax(axis=1), labels.numpy())
        result.per_task.setdefault(task, (0, 0))
        result.skipped += loader.stats.corrupt
    return result


def _count(result: EvalResult, task: int, pred: np.ndarray, labels: np.ndarray) -> None:
    """Add one batch's hits to the task's, each class's and the overall counts."""
    hits = pred == labels
    c, n = result.per_task.get(task, (0, 0))
    result.per_task[task] = (c + int(hits.sum()), n + len(labels))
    for label in np.unique(labels):
        mask = labels == label
        c, n = result.per_class.get(int(label), (0, 0))
        result.per_class[int(label)] = (c + int(hits[mask].sum()), n + int(mask.sum()))
    result.correct += int(hits.sum())
    result.total += len(labels)


def _model_manifest(meta: ModelMetadata, shards_dir: str | Path, model: str) -> Manifest:
    """The shard set as the model's run saw it (lineage), or its default view for a file without lineage."""
    from sdlora_dist.data.manifest import load_manifest

    manifest = load_manifest(shards_dir)
    lineage = read_lineage(meta, model)
    if lineage is None:
        _check_shards_match(meta, manifest.class_names, str(shards_dir))
        return manifest
    check_shards(lineage, manifest, str(shards_dir), model)
    return model_view(lineage, manifest)
