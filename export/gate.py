"""``sdlora gate NEW.onnx --baseline OLD.onnx --data SHARDS``: may NEW replace OLD in production?

Both files are evaluated by onnxruntime (the engine that serves them) on the test shards, each through
``evaluate_onnx`` (so the per-task numbers are exactly ``sdlora evaluate``'s), each read the way its own run read
the shards (lineage). The baseline's classes are the *old* classes; NEW must contain every one of them (by name).

NEW passes when, on the old classes' test images,

- the accuracy over all old classes drops by at most ``max_drop`` points (default 2.0), and
- no single old class drops by more than ``max_class_drop`` points (default 10.0).

Why these defaults: adding a task to a class-incremental model always costs the old classes a little, because their
logits now compete with the new classes' (SD-LoRA's reported forgetting is a few points over a whole 10- or 20-task
sequence, so a fraction of that per task); 2 points of old-class accuracy per update is a loose bound on that
normal cost and a tight one on a broken update. A single class is measured on far fewer images than the whole
(a few dozen to a few hundred), so its bound must sit above the noise: at 90 % accuracy on 50 images the binomial
standard error is 4.2 points, and 10 points is about 2.4 of them, which flags a class that really collapsed without
failing an update on one unlucky image. Tighten both for large test sets.

Exit codes (``cli/lifecycle_cmds.py``): 0 pass, :data:`GATE_FAILED` (3) fail, 2 refusal (wrong input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora_dist.data.classes import even_split
from sdlora_dist.errors import UserError
from sdlora_dist.export.evaluate import EvalResult, evaluate_onnx
from sdlora_dist.export.lineage import Lineage, read_lineage
from sdlora_dist.export.metadata import ModelMetadata, read_metadata
from sdlora_dist.fileio import file_sha256

GATE_FAILED = 3  # the exit code of a failed gate: distinct from 1 (crash) and 2 (refused input)
DEFAULT_MAX_DROP = 2.0
DEFAULT_MAX_CLASS_DROP = 10.0
WORST = 5  # classes listed in the report's "worst classes"


@dataclass
class GateResult:
    """The verdict, why, and every number behind it (``to_dict`` is the JSON report)."""

    passed: bool
    failures: list[str]
    old_classes: dict[str, float]  # baseline / new accuracy over the old classes, and the drop (points)
    tasks: list[dict[str, Any]]  # one row per task of NEW
    classes: list[dict[str, Any]]  # one row per old class: baseline, new, drop
    models: dict[str, dict[str, Any]]  # "baseline" / "new": path, sha256, lineage, evaluation
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> list[dict[str, Any]]:
        """The old classes that lost the most."""
        return sorted(self.classes, key=lambda c: -c["drop"])[:WORST]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {"passed": self.passed, "exit_code": 0 if self.passed else GATE_FAILED, "failures": self.failures,
                "thresholds": self.thresholds, "old_classes": self.old_classes, "tasks": self.tasks,
                "worst_classes": self.worst, "classes": self.classes, "models": self.models}  # fmt: skip

    def table(self) -> str:
        """The per-task table, the worst classes and the verdict, as printed by the CLI and the demo."""
        lines = ["task  classes                   baseline      new    delta", "-" * 58]
        for row in self.tasks:
            base = f"{row['baseline']:8.2f}" if row["baseline"] is not None else "     new"
            delta = f"{row['delta']:+8.2f}" if row["delta"] is not None else "       -"
            names = ",".join(row["classes"])
            lines.append(f"{row['task']:>4}  {names[:24]:<24}  {base}  {row['new']:7.2f}  {delta}")
        old = self.old_classes
        lines.append(f"old classes: {old['baseline']:.2f} -> {old['new']:.2f} (drop {old['drop']:.2f} points, "
                     f"max {self.thresholds['max_drop']:.2f})")  # fmt: skip
        worst = ", ".join(f"{c['class']} {c['baseline']:.1f}->{c['new']:.1f}" for c in self.worst)
        lines.append(f"worst classes (max drop {self.thresholds['max_class_drop']:.2f}): {worst}")
        verdict = "PASS" if self.passed else f"FAIL (exit {GATE_FAILED}): " + "; ".join(self.failures)
        return "\n".join([*lines, f"gate: {verdict}"])


def _pct(correct: int, total: int) -> float:
    return round(100.0 * correct / total, 4) if total else 0.0


def _open(path: Path, role: str) -> tuple[ModelMetadata, Lineage | None]:
    """Metadata and lineage of a file; a non-sdlora ONNX is refused with one line."""
    if not path.is_file():
        raise UserError(f"{role} {path} does not exist: pass a file written by 'sdlora export'")
    meta = read_metadata(path)
    return meta, read_lineage(meta, str(path))


def _tasks_of(meta: ModelMetadata, lineage: Lineage | None) -> list[list[str]]:
    """Class names per task (lineage; a file from before lineage is assumed split evenly, the default)."""
    if lineage is not None:
        return lineage.task_classes
    sizes = even_split(meta.num_classes, meta.num_tasks)
    starts = [sum(sizes[:t]) for t in range(meta.num_tasks)]
    return [list(meta.class_names[a : a + n]) for a, n in zip(starts, sizes, strict=True)]


def _by_name(meta: ModelMetadata, result: EvalResult) -> dict[str, tuple[int, int]]:
    return {meta.class_names[label]: counts for label, counts in result.per_class.items()}


def _task_rows(new_tasks: list[list[str]], base: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]]) -> list:
    rows = []
    for t, names in enumerate(new_tasks):
        n_c, n_n = (sum(new[c][i] for c in names if c in new) for i in (0, 1))
        known = all(c in base for c in names)
        b_c, b_n = (sum(base[c][i] for c in names) for i in (0, 1)) if known else (0, 0)
        b_acc = _pct(b_c, b_n) if known else None
        rows.append({"task": t, "classes": names, "baseline": b_acc, "new": _pct(n_c, n_n), "correct": n_c,
                     "total": n_n, "delta": round(_pct(n_c, n_n) - b_acc, 4) if known else None})  # fmt: skip
    return rows


def _model_entry(path: Path, lineage: Lineage | None, result: EvalResult) -> dict[str, Any]:
    return {"path": str(path), "sha256": file_sha256(path), "lineage": json.loads(lineage.to_json()) if lineage
            else None, "evaluation": result.to_dict()}  # fmt: skip


def run_gate(
    new_path: str | Path,
    baseline_path: str | Path,
    shards: str | Path,
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP,
    batch_size: int = 64,
    provider: str | None = None,
) -> GateResult:
    """Evaluate both files on ``shards`` and judge NEW against the baseline (module docstring: rules, defaults)."""
    if max_drop < 0 or max_class_drop < 0:
        raise UserError(f"--max-drop and --max-class-drop must be >= 0 (got {max_drop}, {max_class_drop})")
    new_path, baseline_path = Path(new_path), Path(baseline_path)
    base_meta, base_lineage = _open(baseline_path, "--baseline")
    new_meta, new_lineage = _open(new_path, "NEW")
    missing = [c for c in base_meta.class_names if c not in set(new_meta.class_names)]
    if missing:
        raise UserError(
            f"{new_path} does not contain {len(missing)} of the {base_meta.num_classes} classes of the baseline "
            f"{baseline_path} (e.g. {missing[:3]}): the gate compares a model with the one it replaces"
        )
    base_result = evaluate_onnx(baseline_path, shards, batch_size=batch_size, provider=provider)
    new_result = evaluate_onnx(new_path, shards, batch_size=batch_size, provider=provider)
    base, new = _by_name(base_meta, base_result), _by_name(new_meta, new_result)
    classes = []
    for name in base_meta.class_names:
        counts = base.get(name, (0, 0))
        b, n = _pct(*counts), _pct(*new.get(name, (0, 0)))
        classes.append({"class": name, "baseline": b, "new": n, "drop": round(b - n, 4), "total": counts[1]})
    old_b = _pct(sum(base[c][0] for c in base), sum(base[c][1] for c in base))
    old_n = _pct(sum(new[c][0] for c in base), sum(new[c][1] for c in base))
    old = {"baseline": old_b, "new": old_n, "drop": round(old_b - old_n, 4)}
    failures = []
    if old["drop"] > max_drop:
        failures.append(f"old classes lost {old['drop']:.2f} points (max {max_drop:.2f})")
    over = [c for c in classes if c["drop"] > max_class_drop]
    if over:
        failures.append(f"{len(over)} old classes lost more than {max_class_drop:.2f} points (worst "
                        f"{max(over, key=lambda c: c['drop'])['class']!r})")  # fmt: skip
    return GateResult(
        passed=not failures,
        failures=failures,
        old_classes=old,
        tasks=_task_rows(_tasks_of(new_meta, new_lineage), base, new),
        classes=classes,
        models={
            "baseline": _model_entry(baseline_path, base_lineage, base_result),
            "new": _model_entry(new_path, new_lineage, new_result),
        },  # fmt: skip
        thresholds={"max_drop": max_drop, "max_class_drop": max_class_drop},
    )
