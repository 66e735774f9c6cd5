"""Where an exported model came from: the ``sdlora.lineage`` entry of its ONNX ``metadata_props`` (one JSON object).

Schema (``format`` 1)::

    {"format": 1, "run_id": "digits-20261206-041500", "task": 3, "num_tasks": 4, "run_tasks_done": 5,
     "benchmark": "digits", "data_fingerprint": "<manifest fingerprint of the shard set trained on>",
     "class_order_from": "seed 1", "task_classes": [["2", "9"], ...],   # class names per task, in label order
     "split_fingerprint": "<sha256[:16] of task_classes>", "config_hash": "...",
     "parent_sha256": "<sha256 of the export of the task before, when known>" | null,
     "test_accuracy": {"per_task": [97.2, ...], "correct": [...], "totals": [...], "top1": 96.1} | null}

``task_classes`` is what lets ``evaluate`` and ``gate`` read a shard set the way the run did (its own class order and
task split, which need not be the shard set's default): each class is found in the shards by name. The accuracy is
the run's own PyTorch evaluation after ``task`` (``progress.json``), so a served file can be compared with it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import ModelMetadata

if TYPE_CHECKING:  # the data pipeline imports torch; reading and printing lineage must not (serving hosts)
    from sdlora_dist.data.manifest import Manifest

FORMAT = 1


@dataclass(frozen=True)
class Lineage:
    """Provenance of one exported model (see the module docstring for the JSON form)."""

    run_id: str
    task: int
    num_tasks: int
    run_tasks_done: int
    benchmark: str
    data_fingerprint: str
    class_order_from: str
    task_classes: list[list[str]]
    split_fingerprint: str
    config_hash: str
    parent_sha256: str | None = None
    test_accuracy: dict[str, Any] | None = None
    format: int = FORMAT

    def to_json(self) -> str:
        """The ``sdlora.lineage`` value."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Lineage:
        """Parse a ``sdlora.lineage`` value; UserError naming ``source`` when it is damaged."""
        try:
            raw = json.loads(text)
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{source}: metadata sdlora.lineage is not a lineage record ({exc})") from exc

    @property
    def class_names(self) -> list[str]:
        """Every class of the model, in label order."""
        return [name for task in self.task_classes for name in task]


def read_lineage(meta: ModelMetadata, source: str) -> Lineage | None:
    """The lineage of a file's metadata (None for files exported before lineage existed)."""
    return Lineage.from_json(meta.lineage, source=source) if meta.lineage else None


def check_shards(lineage: Lineage, manifest: Manifest, shards: str, model: str) -> None:
    """UserError when ``manifest`` is not the shard set the model was trained on (fingerprint, class names)."""
    if lineage.data_fingerprint and lineage.data_fingerprint != manifest.fingerprint:
        raise UserError(
            f"the shards in {shards} (benchmark {manifest.benchmark!r}, fingerprint {manifest.fingerprint[:12]}) are "
            f"not the shard set {model} was trained on (benchmark {lineage.benchmark!r}, fingerprint "
            f"{lineage.data_fingerprint[:12]}); pass the shard set of run {lineage.run_id}"
        )
    missing = sorted(set(lineage.class_names) - set(manifest.stored_names or manifest.class_names))
    if missing:
        raise UserError(
            f"the shards in {shards} lack {len(missing)} classes of {model} (e.g. {missing[:3]}); add them with "
            "'sdlora data add-task' or pass the shard set the model was trained on"
        )


def model_view(lineage: Lineage, manifest: Manifest) -> Manifest:
    """The shard set as the model's run saw it: its class order and task split, classes found by name."""
    from sdlora_dist.data.classes import TaskSplit, task_view

    stored = list(manifest.stored_names or manifest.class_names)
    index = {name: i for i, name in enumerate(stored)}
    order = [index[name] for name in lineage.class_names]
    split = TaskSplit(order, [len(t) for t in lineage.task_classes], lineage.class_order_from, None)
    return task_view(manifest, split)


def describe(meta: ModelMetadata, lineage: Lineage | None, path: str, sha256: str) -> str:
    """Human-readable lines for ``sdlora inspect`` / ``predict --info``."""
    lines = [
        f"model: {path}",
        f"  sha256: {sha256}",
        f"  classes: {meta.num_classes} after {meta.num_tasks} tasks; input {meta.input_layout} "
        f"{meta.input_size}, {meta.precision}; package {meta.package_version}",
        f"  config hash: {meta.config_hash}",
    ]
    if lineage is None:
        return "\n".join([*lines, "  lineage: none recorded (exported before lineage existed)"])
    acc = lineage.test_accuracy
    lines += [
        f"  run: {lineage.run_id}, task {lineage.task} of the {lineage.run_tasks_done} it had finished",
        f"  data: benchmark {lineage.benchmark!r}, fingerprint {lineage.data_fingerprint[:16] or '?'}, class order "
        f"{lineage.class_order_from}, split fingerprint {lineage.split_fingerprint}",
        f"  parent: {lineage.parent_sha256 or 'none recorded'}",
        f"  classes per task: {[len(t) for t in lineage.task_classes]}",
    ]
    if acc:
        per_task = ", ".join(f"{v:.2f}" for v in acc["per_task"])
        lines.append(f"  test accuracy at training time: top1 {acc['top1']:.2f}; per task [{per_task}]")
    return "\n".join(lines)
