"""Class-incremental metrics from exact counts: accuracy matrix, Acc, AAA, mean task accuracy, forgetting, BWT.

Rows are "after task t", columns are task groups in numeric order (the reference toolbox sorts group keys as
strings, which scrambles the matrix past 100 classes -- reference-sdlora.md section 6; we index by integers).
All values are percentages.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AccuracyLog:
    """Per-task-group correct counts after each task, and the test-set size of each group."""

    correct: list[list[int]] = field(default_factory=list)  # correct[t][j], j <= t
    totals: list[int] = field(default_factory=list)  # totals[j]: test samples of task j

    def add_row(self, correct: list[int], totals: list[int]) -> None:
        """Record the evaluation after the next task (``len(correct) == len(self.correct) + 1``)."""
        if len(correct) != len(self.correct) + 1 or len(totals) != len(correct):
            raise ValueError(f"row {len(self.correct)} needs {len(self.correct) + 1} groups (got {len(correct)})")
        if self.totals and list(totals[: len(self.totals)]) != self.totals:
            raise ValueError(f"test-set sizes changed between tasks: {self.totals} vs {totals}")
        self.correct.append([int(c) for c in correct])
        self.totals = [int(n) for n in totals]

    @property
    def num_tasks(self) -> int:
        """Rows so far."""
        return len(self.correct)

    def matrix(self) -> list[list[float | None]]:
        """``acc[t][j]`` in percent; ``None`` for groups not seen yet (j > t)."""
        n = self.num_tasks
        return [
            [100.0 * row[j] / self.totals[j] if j < len(row) and self.totals[j] else None for j in range(n)]
            for row in self.correct
        ]

    def top1_curve(self) -> list[float]:
        """Per-sample accuracy over all seen classes after each task (the paper's "Acc" at each step)."""
        return [100.0 * sum(row) / max(1, sum(self.totals[: len(row)])) for row in self.correct]

    def to_dict(self) -> dict[str, Any]:
        """Counts plus every derived metric, for metrics.json."""
        return {"correct": self.correct, "totals": self.totals, "matrix": self.matrix(), **summary(self)}



def forgetting(matrix: list[list[float | None]]) -> float:
    """Mean over groups j < T-1 of (best accuracy ever on j) - (final accuracy on j); 0 for one task.

    "Best ever" includes the final row, as the reference toolbox does (trainer.py:114-137), so the value is >= 0.
    """
    t_final = len(matrix) - 1
    if t_final < 1:
        return 0.0
    drops = []
    for j in range(t_final):
        history = [matrix[t][j] for t in range(j, t_final + 1)]
        drops.append(max(history) - matrix[t_final][j])
    return sum(drops) / len(drops)


def backward_transfer(matrix: list[list[float | None]]) -> float:
    """BWT: mean over j < T-1 of (final accuracy on j) - (accuracy on j right after learning it)."""
    t_final = len(matrix) - 1
    if t_final < 1:
        return 0.0
    return sum(matrix[t_final][j] - matrix[j][j] for j in range(t_final)) / t_final


def summary(log: AccuracyLog) -> dict[str, float]:
    """Acc (final top-1 over seen classes), AAA (mean of that curve), mean task accuracy, forgetting, BWT."""
    if not log.num_tasks:
        return {}
    curve = log.top1_curve()
    matrix = log.matrix()
    final = [v for v in matrix[-1] if v is not None]
    return {
        "acc": curve[-1],
        "aaa": sum(curve) / len(curve),
        "mean_task_acc": sum(final) / len(final),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "top1_curve": curve,
    }


def matrix_csv(log: AccuracyLog) -> str:
    """The accuracy matrix as CSV (rows: after task t; columns: task 0..T-1; plus the top-1 column)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["after_task", *[f"task_{j}" for j in range(log.num_tasks)], "top1_seen"])
    for t, (row, top1) in enumerate(zip(log.matrix(), log.top1_curve(), strict=True)):
        writer.writerow([t, *["" if v is None else f"{v:.2f}" for v in row], f"{top1:.2f}"])
    return out.getvalue()


def format_table(log: AccuracyLog) -> str:
    """A plain-text table of the matrix and the summary, for the console."""
    lines = ["after | " + " ".join(f"{'t' + str(j):>6}" for j in range(log.num_tasks)) + " |   top1"]
    for t, (row, top1) in enumerate(zip(log.matrix(), log.top1_curve(), strict=True)):
        cells = " ".join(f"{v:6.1f}" if v is not None and math.isfinite(v) else "      " for v in row)
        lines.append(f"{t:>5} | {cells} | {top1:6.2f}")
    s = summary(log)
    if s:
        lines.append(
            f"Acc {s['acc']:.2f}  AAA {s['aaa']:.2f}  mean task acc {s['mean_task_acc']:.2f}  "
            f"forgetting {s['forgetting']:.2f}  BWT {s['bwt']:.2f}"
        )
    return "\n".join(lines)
