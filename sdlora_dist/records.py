"""What a run records per task: :class:`TaskRecord`, and :class:`RunProgress` (every record plus the accuracy log).

One typed form shared by the recipe (writes), ``checkpoint.load_progress`` (resumes) and the reports (read). On disk
a record is the JSON object :meth:`TaskRecord.to_dict` gives: an entry of ``metrics.json``'s ``tasks`` list, and the
``record`` of a task folder's ``progress.json``. Reading checks every key once, so a damaged file is one readable
error naming it, and nothing downstream looks keys up by string.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdlora_dist.class_metrics import class_accuracy
from sdlora_dist.consolidate import Decision
from sdlora_dist.errors import UserError
from sdlora_dist.metrics import AccuracyLog

# keys every record has held since the first release; head_align came later and is optional
RECORD_KEYS = ("task", "classes", "rank", "consolidation_of_previous", "magnitudes", "train", "world_size", "time_s")


@dataclass
class TrainStats:
    """One task's training loop: optimizer steps, the last loss read, images seen, corrupt samples skipped."""

    steps: int
    final_loss: float
    images: int
    corrupt_skipped: int
    precision: str | None = None  # the engine's arithmetic (fp32, bf16, fp16); absent in runs written before it
    device: str | None = None  # cpu or cuda


@dataclass
class TaskRecord:
    """One finished task: its classes and rank, how the previous pair was closed, magnitudes, times and counts."""

    task: int
    classes: int
    rank: int | None  # rank of the pair this task trained (None when the model had no open pair)
    consolidation_of_previous: Decision | None  # decided at the start of this task (None for task 0)
    magnitudes: dict[str, list[float]]  # pair key -> alpha values (1 shared, 2 x blocks per_layer) after the task
    train: TrainStats
    world_size: int
    time_s: dict[str, float]  # phase -> seconds (recipe.run_task's timers)
    head_align: dict[str, Any] | None = None  # head_align.Aligned.record; absent in runs written before it
    head: str | None = None  # train.head, recorded only when it is not the paper's linear head (or drift is on)
    drift: str | None = None  # train.drift, recorded with head

    @property
    def seconds(self) -> float:
        """Wall time of the task over all phases."""
        return sum(float(v) for v in self.time_s.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to metrics.json and progress.json (keys in the order the files have always had).

        ``time_s`` is this record's own dict, not a copy: the checkpoint writer adds its phase while writing, and
        both files must show it.
        """
        decision = self.consolidation_of_previous
        out = {"task": self.task, "classes": self.classes, "rank": self.rank,
               "consolidation_of_previous": decision.to_dict() if decision else None, "magnitudes": self.magnitudes,
               "train": asdict(self.train), "world_size": self.world_size}  # fmt: skip
        if self.head_align is not None:
            out["head_align"] = self.head_align
        if self.head is not None:
            out["head"], out["drift"] = self.head, self.drift
        out["time_s"] = self.time_s
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> TaskRecord:
        """Inverse of :meth:`to_dict`; UserError naming ``source`` (the file read) when a key is missing or odd."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: a task record is not a JSON object; the file is damaged")
        missing = [k for k in RECORD_KEYS if k not in data]
        if missing:
            raise UserError(
                f"{source}: the record of task {data.get('task', '?')} lacks {missing}; the file is damaged or "
                "from another tool"
            )
        decision = data["consolidation_of_previous"]
        try:
            return cls(
                task=int(data["task"]), classes=int(data["classes"]), rank=data["rank"],
                consolidation_of_previous=Decision.from_dict(decision) if decision else None,
                magnitudes={k: list(v) for k, v in data["magnitudes"].items()}, train=TrainStats(**data["train"]),
                world_size=int(data["world_size"]), time_s=dict(data["time_s"]), head_align=data.get("head_align"),
                head=data.get("head"), drift=data.get("drift"),
            )  # fmt: skip
        except (TypeError, ValueError, AttributeError) as exc:
            raise UserError(
                f"{source}: the record of task {data['task']} is malformed ({exc}); the file is damaged"
            ) from exc


@dataclass
class RunProgress:
    """Recipe progress kept apart from the weights: the accuracy log and one record per finished task."""

    log: AccuracyLog = field(default_factory=AccuracyLog)
    tasks: list[TaskRecord] = field(default_factory=list)
    class_correct: list[list[int]] = field(default_factory=list)  # [after task t][global label]
    class_totals: list[int] = field(default_factory=list)  # test samples per seen class
    confusion: list[list[int]] | None = None  # [true][predicted] after the newest task

    @property
    def steps(self) -> int:
        """Optimizer steps of every finished task: where the run's step axis (tracking) stands."""
        return sum(record.train.steps for record in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """Everything metrics.json holds (per-class sections only for runs that recorded them)."""
        out = {"accuracy": self.log.to_dict(), "tasks": [r.to_dict() for r in self.tasks]}
        if self.class_correct and self.confusion is not None:
            # an earlier row covers fewer classes (those seen by then): its totals are the first len(row)
            accuracy = [class_accuracy(row, self.class_totals[: len(row)]) for row in self.class_correct]
            out["per_class"] = {"correct": self.class_correct, "totals": self.class_totals, "accuracy": accuracy}
            out["confusion"] = {"after_task": len(self.class_correct) - 1, "matrix": self.confusion}
        return out
