"""Per-class accuracy and the confusion matrix: what a person debugging a class-incremental model looks at first.

The confusion matrix counts (true label, predicted label) over every seen class's test samples, in global-label
order. At 200 classes a 200 x 200 heatmap is unreadable, so the report shows it two ways that stay readable: grouped
by task (rows: true task, columns: predicted task, row-normalised: the off-diagonal mass is inter-task confusion, the
failure mode of class-incremental learning) and the top individual confusions as a ranked bar chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def class_counts(confusion: list[list[int]]) -> tuple[list[int], list[int]]:
    """(correct, total) test samples per class from a confusion matrix (rows: true class)."""
    grid = np.asarray(confusion, dtype=np.int64).reshape(len(confusion), -1)
    return np.diag(grid).tolist(), grid.sum(axis=1).tolist()


def class_accuracy(correct: list[int], totals: list[int]) -> list[float | None]:
    """Percent correct per class; None for a class without test samples."""
    return [100.0 * c / n if n else None for c, n in zip(correct, totals, strict=True)]


def task_of_class(classes_per_task: list[int]) -> np.ndarray:
    """The task index of each global label (labels are assigned task by task)."""
    return np.repeat(np.arange(len(classes_per_task)), classes_per_task)


def task_confusion(confusion: list[list[int]], classes_per_task: list[int]) -> np.ndarray:
    """Row-normalised (percent) confusion between tasks: [true task, predicted task]."""
    grid = np.asarray(confusion, dtype=np.float64)
    tasks = task_of_class(classes_per_task)[: len(grid)]
    onehot = np.eye(int(tasks.max()) + 1)[tasks]  # [classes, tasks]
    grouped = onehot.T @ grid @ onehot  # [true task, predicted task] counts
    return 100.0 * grouped / np.maximum(grouped.sum(axis=1, keepdims=True), 1.0)


def _name(names: list[str], label: int) -> str:
    return names[label] if label < len(names) else str(label)


def top_confusions(confusion: list[list[int]], names: list[str], k: int = 20) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal counts: true and predicted class (label and name), count, share of the true
    class's test samples in percent."""
    grid = np.asarray(confusion, dtype=np.int64)
    off = grid.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]  # ties: lower (true, predicted) first
    rows = grid.sum(axis=1)
    out = []
    for flat in order:
        true, pred = divmod(int(flat), grid.shape[1])
        if off[true, pred] == 0:
            break
        count = int(off[true, pred])
        out.append({"true": true, "true_name": _name(names, true), "predicted": pred,
                    "predicted_name": _name(names, pred), "count": count,
                    "percent": 100.0 * count / max(int(rows[true]), 1)})  # fmt: skip
    return out


def plot_confusion(confusion: list[list[int]], names: list[str], classes_per_task: list[int], path: Path,
                   figure: Any) -> None:  # fmt: skip
    """Two panels: task-grouped confusion (annotated) and the top 20 class confusions (bars)."""
    grouped = task_confusion(confusion, classes_per_task)
    top = top_confusions(confusion, names)
    fig = figure(13.0, 6.0)
    left, right = fig.subplots(1, 2, width_ratios=[1.0, 1.2])
    image = left.imshow(grouped, cmap="magma", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=left, label="% of the true task's test samples", shrink=0.8)
    if len(grouped) <= 25:  # the numbers fit in the cells
        for (t, j), v in np.ndenumerate(grouped):
            left.text(j, t, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    left.set_xlabel("predicted task")
    left.set_ylabel("true task")
    left.set_title("Confusion grouped by task")
    labels = [f"{c['true_name'][:18]} -> {c['predicted_name'][:18]}" for c in top][::-1]
    right.barh(range(len(top)), [c["count"] for c in top][::-1], color="tab:red")
    right.set_yticks(range(len(top)), labels, fontsize=7)
    right.set_xlabel("test samples")
    right.set_title(f"Top {len(top)} class confusions (true -> predicted)")
    fig.savefig(path)


def plot_class_accuracy(accuracy: list[float | None], classes_per_task: list[int], path: Path, figure: Any) -> None:
    """Final accuracy of every class, coloured by the task that introduced it (readable as a strip at 200)."""
    values = np.array([np.nan if v is None else v for v in accuracy])
    tasks = task_of_class(classes_per_task)[: len(values)]
    fig = figure(min(16.0, 4.0 + 0.06 * len(values)), 4.0)
    ax = fig.add_subplot()
    colors = np.array([f"C{t % 10}" for t in tasks])
    ax.bar(np.arange(len(values)), np.nan_to_num(values), color=colors, width=1.0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("class (global label; colour: the task that introduced it)")
    ax.set_ylabel("accuracy after the last task (%)")
    ax.set_title("Per-class accuracy")
    fig.savefig(path)
