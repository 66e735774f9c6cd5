"""Class order and task split chosen at train time, over a shard set grouped by class.

A class-grouped shard set (manifest format 2) stores each class's samples in its own shards, labelled with the
class's index in the manifest's ``classes`` list (its *stored* label). A run chooses the class order
(``data.class_order_seed`` or an explicit ``data.class_order``) and the split of the prepared classes into tasks
(``data.tasks`` or ``data.classes_per_task``); classes appended with ``sdlora data add-task`` follow as their own
tasks. :func:`task_view` turns the manifest into the run's view: global labels in the run's order, each task's
shards = the shards of its classes only, and the stored -> global label map the loaders apply.

The seeded order is the authors' toolkit rule, ``np.random.seed(s); np.random.permutation(n)``
(``RandomState(s).permutation(n)`` draws the same numbers), so a seed gives the same order as theirs.

"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdlora_dist.data.manifest import Manifest
from sdlora_dist.errors import UserError, listed


def seeded_order(num_classes: int, seed: int) -> list[int]:
    """The authors' class order: ``np.random.seed(seed); np.random.permutation(num_classes)``."""
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def even_split(num_classes: int, tasks: int, key: str = "--tasks") -> list[int]:
    """Classes per task: equal shares, the first ``num_classes % tasks`` tasks take one more."""
    if tasks <= 0:
        raise UserError(f"{key} must be >= 1 (got {tasks})")
    if tasks > num_classes:
        raise UserError(f"{key} {tasks} is more than the {num_classes} classes of the shard set: use at most that")
    base, extra = divmod(num_classes, tasks)
    return [base + (1 if t < extra else 0) for t in range(tasks)]


def one_class_warning(classes_per_task: list[int], fix: str) -> str | None:
    """A warning naming the tasks with a single class (None when there are none); ``fix`` says what to pass instead.

    The loss is over the current task's classes only (masked_cross_entropy): with one class it is 0 whatever the
    model does, so such a task trains nothing and its magnitude never moves.
    """
    single = [t for t, n in enumerate(classes_per_task) if n == 1]
    if not single:
        return None
    tasks = ", ".join(str(t) for t in single)
    return (
        f"warning: task(s) {tasks} of {classes_per_task} hold one class: the loss over a task's own classes is then 0 "
        f"and nothing is learned; {fix}"
    )


@dataclass
class TaskSplit:
    """A run's class order and task split, over the stored class indices of a shard set."""

    class_order: list[int]  # stored class index of each global label
    classes_per_task: list[int]
    order_from: str  # how the order was chosen, for the run record: "seed 1993", "explicit"
    class_order_seed: int | None

    def task_classes(self, task: int) -> list[int]:
        """Stored class indices of ``task``, in global-label order."""
        start = sum(self.classes_per_task[:task])
        return self.class_order[start : start + self.classes_per_task[task]]

    def record(self, names: list[str]) -> dict[str, Any]:
        """What run.json keeps: the seed, the order, the split, each task's class names and their fingerprint."""
        tasks = [[names[c] for c in self.task_classes(t)] for t in range(len(self.classes_per_task))]
        return {
            "class_order_seed": self.class_order_seed,
            "class_order_from": self.order_from,
            "class_order": list(self.class_order),
            "classes_per_task": list(self.classes_per_task),
            "task_classes": tasks,
            "fingerprint": split_fingerprint(tasks),
        }


def split_fingerprint(task_classes: list[list[str]]) -> str:
    """sha256 of the per-task class-name lists: equal iff every task holds the same classes in the same order."""
    return hashlib.sha256(json.dumps(task_classes).encode()).hexdigest()[:16]


def _base_count(manifest: Manifest) -> int:
    """Classes the shard set was prepared with (the rest came with add-task)."""
    return len(manifest.stored_names) - sum(len(a["classes"]) for a in manifest.added_tasks)


def _explicit_order(order: list[int], n: int) -> list[int]:
    if sorted(order) != list(range(n)):
        missing = sorted(set(range(n)) - set(order))
        extra = sorted({c for c in order if not 0 <= c < n} | {c for c in set(order) if order.count(c) > 1})
        raise UserError(
            f"data.class_order must list each of the {n} prepared classes (0..{n - 1}, as 'sdlora data inspect' "
            f"numbers them) exactly once (missing: {listed(missing) or 'none'}; "
            f"out of range or repeated: {listed(extra) or 'none'})"
        )
    return list(order)


def _base_split(n: int, tasks: int | None, classes_per_task: list[int] | None, default: list[int]) -> list[int]:
    if classes_per_task is not None:
        if sum(classes_per_task) != n or any(c <= 0 for c in classes_per_task):
            raise UserError(
                f"data.classes_per_task {classes_per_task} must be positive and sum to the {n} prepared classes"
            )
        return list(classes_per_task)
    return even_split(n, tasks, "data.tasks") if tasks is not None else list(default)


def resolve_split(manifest: Manifest, data: Any) -> TaskSplit:
    """The run's order and split from ``data`` (class_order_seed, class_order, tasks, classes_per_task).

    Defaults: the order and split the shard set was prepared with (``--seed``/``--tasks``), i.e. today's order.
    """
    n = _base_count(manifest)
    base_default = manifest.default_order[:n]
    default_split = manifest.default_split[: len(manifest.default_split) - len(manifest.added_tasks)]
    if data.class_order is not None:
        order, seed, source = _explicit_order(data.class_order, n), None, "explicit"
    elif data.class_order_seed is not None:
        seed = data.class_order_seed
        order, source = seeded_order(n, seed), f"seed {seed}"
    else:
        order, seed, source = base_default, manifest.seed, f"seed {manifest.seed} (the shard set's)"
    per_task = _base_split(n, data.tasks, data.classes_per_task, default_split)
    for added in manifest.added_tasks:  # new classes arrive as a new task, after the prepared ones
        order = order + list(added["classes"])
        per_task = per_task + [len(added["classes"])]
    return TaskSplit(order, per_task, source, seed)


def task_view(manifest: Manifest, split: TaskSplit) -> Manifest:
    """The manifest as a run sees it: global labels in ``split``'s order, task t's shards = its classes' shards."""
    names = manifest.stored_names
    shards = {
        s: [[shard for c in split.task_classes(t) for shard in manifest.class_shards[s][c]]
            for t in range(len(split.classes_per_task))]
        for s in manifest.class_shards
    }  # fmt: skip
    label_map = [0] * len(names)
    for g, c in enumerate(split.class_order):
        label_map[c] = g
    return dataclasses.replace(
        manifest,
        class_names=[names[c] for c in split.class_order],
        class_order=list(split.class_order),
        classes_per_task=list(split.classes_per_task),
        shards=shards,
        label_map=label_map,
    )


def split_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a run's recorded split and the shards' current one, over the tasks the run knows.

    Tasks appended since (``data add-task``) are not a change: ``--continue`` is how they are learned.
    """
    old, new = recorded["task_classes"], current["task_classes"]
    changes = []
    if len(new) < len(old):
        changes.append(f"the shards now have {len(new)} tasks, the run was trained on {len(old)}")
    for t, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            if sorted(a) == sorted(b):
                changes.append(f"task {t} holds its classes in another order")
            else:
                gone = sorted(set(a) - set(b))
                changes.append(f"task {t} classes changed ({len(gone)} of {len(a)} differ, e.g. {gone[:2]})")
    return changes
