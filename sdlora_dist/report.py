"""``sdlora report RUN_DIR``: plots and a Markdown summary of a run's metrics.json (several runs: report_runs.py).

Reads only what ``sdlora train`` wrote (metrics.json, and config.yaml / run.json when present) and writes, into one
folder that is filled under a temporary name and renamed into place::

    report/
      accuracy_matrix.png   accuracy on each task group (columns) after each task (rows); unseen groups empty
      accuracy_curve.png    top-1 over all seen classes after each task, and the mean of the per-task accuracies
      magnitudes.png        each frozen direction's alpha over the tasks that followed (the paper's Fig. 3 view)
      time_per_task.png     seconds per task, stacked: train / eval / consolidate / checkpoint
      confusion.png         confusion grouped by task, and the top class confusions (runs with per-class counts)
      class_accuracy.png    final accuracy of every class, coloured by task (idem)
      report.md             summary metrics, the matrix, KD/RR decisions per task, the images linked relatively

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot global state, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.consolidate import Decision
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir
from sdlora_dist.model import task_key
from sdlora_dist.records import TaskRecord

REPORT_DIR = "report"
MARKDOWN_FILE = "report.md"
MATRIX_PNG = "accuracy_matrix.png"
CURVE_PNG = "accuracy_curve.png"
MAGNITUDES_PNG = "magnitudes.png"
TIME_PNG = "time_per_task.png"
CONFUSION_PNG = "confusion.png"  # runs that recorded per-class counts (class_metrics.py)
CLASS_ACC_PNG = "class_accuracy.png"
REPORT_FILES = (MARKDOWN_FILE, MATRIX_PNG, CURVE_PNG, MAGNITUDES_PNG, TIME_PNG, CONFUSION_PNG, CLASS_ACC_PNG)
TIME_PHASES = ("train", "eval", "consolidate", "checkpoint")  # recipe.run_task's timers, in stacking order
# summary metrics of metrics.json's accuracy section -> column label (one run's table and the aggregate's)
SUMMARY_KEYS = {"acc": "Acc", "aaa": "AAA", "mean_task_acc": "Mean task acc", "forgetting": "Forgetting", "bwt": "BWT"}
DPI = 120


@dataclass
class ReportFiles:
    """Where a report was written: its folder, the Markdown summary, the PNG files by name, any data files."""

    out_dir: Path
    markdown: Path
    images: dict[str, Path] = field(default_factory=dict)
    data: list[Path] = field(default_factory=list)

    def paths(self) -> list[Path]:
        """Every file written, Markdown first."""
        return [self.markdown, *self.images.values(), *self.data]


@dataclass
class RunMetrics:
    """The parts of a run directory a report reads, checked for shape once."""

    accuracy: dict[str, Any]
    tasks: list[TaskRecord]
    info: dict[str, Any]
    config: dict[str, Any]
    per_class: dict[str, Any] | None = None  # metrics.json 'per_class' (absent in runs written before it)
    confusion: dict[str, Any] | None = None  # metrics.json 'confusion'

    @property
    def matrix(self) -> list[list[float | None]]:
        """``acc[t][j]`` in percent, None where group j was not seen yet."""
        return self.accuracy["matrix"]

    @property
    def num_tasks(self) -> int:
        """Rows of the accuracy matrix (tasks evaluated)."""
        return len(self.matrix)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_run_metrics(run_dir: str | Path) -> RunMetrics:
    """metrics.json (required) plus run.json and config.yaml (optional) of ``run_dir``; UserError on bad input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --run-dir of a 'sdlora train' run")
    path = run_dir / ckpt.METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {ckpt.METRICS_FILE}: train first ('sdlora train ... --run-dir {run_dir}')")
    data = ckpt.read_json(path)
    accuracy = data.get("accuracy") if isinstance(data, dict) else None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(accuracy, dict) or not isinstance(tasks, list):
        raise UserError(f"{path} lacks the 'accuracy' and 'tasks' sections 'sdlora train' writes; train again")
    missing = [k for k in ("matrix", "top1_curve", *SUMMARY_KEYS) if k not in accuracy]
    if not accuracy.get("matrix"):
        raise UserError(f"{path} records no finished task yet: train first (at least one task)")
    if missing:
        raise UserError(f"{path}: 'accuracy' lacks {missing}; the file is damaged or from another tool")
    _check_shapes(path, accuracy, len(tasks))
    records = [TaskRecord.from_dict(r, path) for r in tasks]
    info = ckpt.read_json(run_dir / ckpt.RUN_FILE) if (run_dir / ckpt.RUN_FILE).is_file() else {}
    return RunMetrics(accuracy=accuracy, tasks=records, info=info, config=_read_config(run_dir),
                      per_class=data.get("per_class"), confusion=data.get("confusion"))  # fmt: skip


def _check_shapes(path: Path, accuracy: dict[str, Any], num_records: int) -> None:
    """The matrix is square, the curve and the task records have one entry per row."""
    n = len(accuracy["matrix"])
    if any(not isinstance(row, list) or len(row) != n for row in accuracy["matrix"]):
        raise UserError(f"{path}: the accuracy matrix is not {n} x {n}; the file is damaged")
    if len(accuracy["top1_curve"]) != n:
        raise UserError(f"{path}: top1_curve has {len(accuracy['top1_curve'])} values for {n} tasks; damaged")
    if num_records != n:
        raise UserError(f"{path}: {num_records} task records for {n} matrix rows; the file is damaged")


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config as written by train (validated typed tree, back to a dict), or {} when absent."""
    if not (run_dir / ckpt.CONFIG_FILE).is_file():
        return {}
    return ckpt.load_run_config(run_dir).to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Derived series


def task_mean_curve(matrix: list[list[float | None]]) -> list[float]:
    """Mean over seen task groups of the per-group accuracy, after each task (each task weighs the same)."""
    rows = [[v for v in row if v is not None] for row in matrix]
    return [sum(r) / len(r) if r else math.nan for r in rows]


def closing_decisions(tasks: list[TaskRecord]) -> dict[str, Decision]:
    """Task key -> the consolidation decision that closed its pair (recorded at the start of the next task)."""
    decisions = (r.consolidation_of_previous for r in tasks)
    return {d.task: d for d in decisions if d is not None}


def _frozen_so_far(tasks: list[TaskRecord]) -> Iterator[tuple[int, TaskRecord, set[str]]]:
    """Each task with the keys frozen up to and including its own start (one set, grown as the walk goes on)."""
    frozen: set[str] = set()
    for t, record in enumerate(tasks):
        decision = record.consolidation_of_previous
        if decision is not None and decision.action == "frozen":
            frozen.add(decision.task)
        yield t, record, frozen


def magnitude_series(tasks: list[TaskRecord]) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Frozen direction key -> (after-task indices, alpha values per slot) from the task it was frozen on.

    A task's alpha while its pair is still open scales the unnormalised ``B_t A_t`` (paper section 3), so it is
    in other units than the alpha of a frozen unit direction; only the frozen values are plotted as a series.
    """
    series: dict[str, tuple[list[int], list[list[float]]]] = {}
    for t, record, frozen in _frozen_so_far(tasks):
        for key in (k for k in record.magnitudes if k in frozen):
            xs, ys = series.setdefault(key, ([], []))
            xs.append(t)
            ys.append([float(v) for v in record.magnitudes[key]])
    return series


def open_magnitudes(tasks: list[TaskRecord]) -> list[tuple[int, str, list[float]]]:
    """(task index, key, alpha values) of the pair each task trained, read at the end of that task."""
    out = []
    for t, record, frozen in _frozen_so_far(tasks):
        current = [k for k in record.magnitudes if k not in frozen]
        if current:  # the newest pair: the model keeps magnitudes in the order its tasks were added
            out.append((t, current[-1], [float(v) for v in record.magnitudes[current[-1]]]))
    return out


def magnitude_slots(tasks: list[TaskRecord]) -> int:
    """Values per task magnitude: 1 when shared, 2 x adapted blocks when per_layer."""
    return max((len(v) for r in tasks for v in r.magnitudes.values()), default=1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def finish_accuracy_plot(fig: Any, ax: Any, xs: list[int], ylabel: str, title: str, path: Path, **legend: Any) -> None:
    """Axes of an accuracy-over-tasks plot (at most about 20 ticks, 0-105 %), legend lower left, saved to ``path``."""
    ax.set_xticks(xs if len(xs) <= 25 else xs[:: max(1, len(xs) // 20)])
    ax.set_ylim(0, 105)
    ax.set_xlabel("after training task t")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", **legend)
    fig.savefig(path)


def figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_accuracy_matrix(matrix: list[list[float | None]], path: Path) -> None:
    """Heatmap of the accuracy matrix, values annotated, unseen cells left empty."""
    import numpy as np

    n = len(matrix)
    grid = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in matrix], float))
    size = min(14.0, 2.5 + 0.6 * n)
    fig = figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=100.0, aspect="equal")
    ax.set_facecolor("white")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    if n <= 30:  # past that, the numbers would not fit in the cells
        fontsize = max(4.0, min(10.0, 0.3 * size * 72.0 / n))  # about a third of a cell's width in points
        for (t, j), v in np.ndenumerate(grid.filled(math.nan)):
            if not math.isnan(v):
                color = "black" if v > 60 else "white"
                ax.text(j, t, f"{v:.1f}", ha="center", va="center", fontsize=fontsize, color=color)
    ticks = list(range(0, n, max(1, n // 20)))
    ax.set_xticks(ticks, [str(j) for j in ticks])
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("task group (classes of task j)")
    ax.set_ylabel("after training task t")
    ax.set_title("Accuracy per task group after each task")
    fig.savefig(path)


def plot_accuracy_curve(top1: list[float], task_mean: list[float], path: Path) -> None:
    """Top-1 over all seen classes after each task, and the mean of the per-task accuracies."""
    xs = list(range(len(top1)))
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.plot(xs, top1, marker="o", label="top-1 over seen classes (Acc at each step)")
    ax.plot(xs, task_mean, marker="s", linestyle="--", label="mean of per-task accuracies")
    for x, y in zip(xs, top1, strict=True):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    finish_accuracy_plot(fig, ax, xs, "accuracy (%)", "Accuracy over tasks", path, fontsize=8)


def plot_magnitudes(tasks: list[TaskRecord], path: Path) -> None:
    """Left: each frozen direction's alpha after every later task (Fig. 3); right: each open pair's final alpha."""
    from matplotlib.ticker import MaxNLocator

    series = magnitude_series(tasks)
    opened = open_magnitudes(tasks)
    slots = magnitude_slots(tasks)
    per_slot = f" (mean over {slots} per-layer slots, band = min..max)" if slots > 1 else ""
    fig = figure(11.0, 4.4)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    for key, (xs, ys) in series.items():
        means = [_mean(v) for v in ys]
        (line,) = left.plot(xs, means, marker="o", markersize=3, label=f"alpha of {key}")
        if slots > 1:
            left.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.15)
    if series:
        left.legend(fontsize=7, ncol=max(1, len(series) // 12), loc="best")
    else:
        left.text(0.5, 0.5, "no frozen direction yet", ha="center", va="center", transform=left.transAxes)
    left.set_xlim(-0.5, len(tasks) - 0.5)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("after training task t")
    left.set_ylabel("alpha" + (" (mean)" if slots > 1 else ""))
    left.set_title("Magnitude of each frozen direction over later tasks" + per_slot, fontsize=9)
    left.grid(alpha=0.3)
    right.bar([t for t, _, _ in opened], [_mean(v) for _, _, v in opened], color="tab:gray")
    right.set_xlabel("task t")
    right.set_ylabel("alpha" + (" (mean)" if slots > 1 else ""))
    right.set_title(
        "Alpha of each task's own pair at the end of its training\n(scales the unnormalised B A)", fontsize=9
    )
    right.grid(alpha=0.3, axis="y")
    fig.suptitle("SD-LoRA magnitudes" + (" -- per-layer magnitudes shown as their mean" if slots > 1 else ""))
    fig.savefig(path)


def plot_time_per_task(tasks: list[TaskRecord], path: Path) -> None:
    """Stacked bars of seconds per phase for each task, total written above each bar."""
    phases = list(TIME_PHASES) + sorted({k for r in tasks for k in r.time_s} - set(TIME_PHASES))
    xs = list(range(len(tasks)))
    fig = figure(max(6.4, 0.35 * len(tasks) + 2.0), 4.2)
    ax = fig.add_subplot()
    bottom = [0.0] * len(tasks)
    for phase in phases:
        heights = [float(r.time_s.get(phase, 0.0)) for r in tasks]
        ax.bar(xs, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for x, total in zip(xs, bottom, strict=True):
        ax.annotate(f"{total:.1f}s", (x, total), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(xs if len(xs) <= 25 else xs[:: max(1, len(xs) // 20)])
    ax.set_ylim(0, max(bottom, default=1.0) * 1.15 or 1.0)
    ax.set_xlabel("task t")
    ax.set_ylabel("seconds")
    ax.set_title("Time per task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def pct(v: float | None) -> str:
    """A percentage with two decimals; empty for a missing or NaN value."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def markdown_table(header: list[str], rows: list[list[str]], *, label_column: bool = False) -> list[str]:
    """Markdown table lines, numbers right-aligned; ``label_column`` left-aligns the first column (run names)."""
    align = ["---" if label_column and i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def run_lines(m: RunMetrics) -> list[str]:
    """The Markdown bullet list describing a run: tasks, benchmark and split, config hash, method, world size."""
    info, cfg = m.info, m.config
    lines = [f"- tasks evaluated: {m.num_tasks}"]
    if info:
        lines.append(f"- benchmark: {info.get('benchmark', '?')}, shards: `{info.get('shards', '?')}`")
        if split := info.get("task_split"):
            per_task = split["classes_per_task"]
            shown = f"{per_task[0]} classes each" if len(set(per_task)) == 1 else f"classes per task {per_task}"
            lines.append(f"- task split: {len(per_task)} tasks, {shown}; class order: {split['class_order_from']}, "
                         f"split fingerprint `{split['fingerprint']}`")  # fmt: skip
        lines.append(f"- config hash: `{info.get('config_hash', '?')}`, sdlora-dist {info.get('version', '?')}")
    if cfg:
        a, t = cfg["adapter"], cfg["train"]
        lines.append(f"- model: `{cfg['model']['name']}`, method: {t['method']}, preset: {a['preset']}")
        lines.append(f"- magnitudes: {a['magnitude']}, rank: {a['rank']}, rank schedule (RR): {a['rank_schedule']}")
        lines.append(f"- KD: {'on, threshold ' + str(a['kd_threshold']) if a['kd'] else 'off'}")
    worlds = sorted({r.world_size for r in m.tasks})
    if worlds:
        lines.append(f"- world size: {', '.join(str(w) for w in worlds)}")
    return lines


def _decision_rows(m: RunMetrics) -> list[list[str]]:
    closed = closing_decisions(m.tasks)
    own = {t: (key, vals) for t, key, vals in open_magnitudes(m.tasks)}
    rows = []
    for t, record in enumerate(m.tasks):
        key, alpha = own.get(t, (task_key(t), []))
        decision = closed.get(key)
        if decision is None:
            outcome = "open (last task)" if t == len(m.tasks) - 1 else "?"
        else:
            outcome = decision.action
        residual = decision.relative_residual if decision else None
        loss = record.train.final_loss
        rows.append(
            [
                str(t),
                str(record.classes),
                str(record.rank),
                f"{_mean(alpha):.4f}" if alpha else "",
                outcome,
                "" if residual is None else f"{residual:.3g}",
                "" if loss is None else f"{loss:.4f}",
                f"{record.seconds:.1f}",
            ]
        )
    return rows


def render_markdown(m: RunMetrics, title: str) -> str:
    """The report's Markdown text; images are linked relatively (they sit beside report.md)."""
    acc = m.accuracy
    n = m.num_tasks
    lines = [f"# SD-LoRA run report: {title}", "", *run_lines(m), "", "## Summary (%)", ""]
    lines += markdown_table(list(SUMMARY_KEYS.values()), [[pct(acc[k]) for k in SUMMARY_KEYS]])
    lines += ["", "Acc: top-1 over all seen classes after the last task; AAA: mean of that over tasks; "]
    lines[-1] += "forgetting and BWT over the groups before the last."
    lines += ["", "## Accuracy matrix (%)", "", "Row t: after training task t; column j: the classes of task j.", ""]
    header = ["after task", *[f"task {j}" for j in range(n)], "top-1 seen", "task mean"]
    means = task_mean_curve(m.matrix)
    rows = [
        [str(t), *[pct(v) for v in row], pct(acc["top1_curve"][t]), pct(means[t])] for t, row in enumerate(m.matrix)
    ]
    lines += markdown_table(header, rows)
    lines += ["", f"![accuracy matrix]({MATRIX_PNG})", "", f"![accuracy curve]({CURVE_PNG})", ""]
    lines += ["## Tasks: rank (RR), magnitude, consolidation (KD)", ""]
    lines += ["How each task's pair was closed: `frozen` = kept as a new past direction, `absorbed` = KD folded it"]
    lines[-1] += " into the past directions (relative residual below the threshold), `kept` = lora-seq's single pair."
    lines += [""]
    header = ["task", "classes", "rank", "own alpha at end", "pair closed as", "KD residual", "final loss", "time (s)"]
    lines += markdown_table(header, _decision_rows(m))
    lines += ["", f"![magnitudes]({MAGNITUDES_PNG})", ""]
    if (slots := magnitude_slots(m.tasks)) > 1:
        lines += [f"Per-layer magnitudes ({slots} slots per task): the plot shows each task's mean, band min..max."]
        lines += [""]
    lines += [f"![time per task]({TIME_PNG})", ""]
    lines += class_lines(m)
    return "\n".join(lines)


def class_lines(m: RunMetrics) -> list[str]:
    """The per-class section: worst classes, top confusions and the two plots (runs with per-class counts)."""
    from sdlora_dist.class_metrics import top_confusions

    if m.per_class is None or m.confusion is None:
        return []
    names = list(m.info.get("class_names", []))
    final = m.per_class["accuracy"][-1]
    worst = sorted((v, i) for i, v in enumerate(final) if v is not None)[:10]
    lines = ["## Per class", "", "Lowest final accuracy:", ""]
    lines += markdown_table(["class", "name", "accuracy (%)"],
                            [[str(i), names[i] if i < len(names) else "", pct(v)] for v, i in worst])  # fmt: skip
    lines += ["", f"Top confusions after task {m.confusion['after_task']}:", ""]
    rows = [[f"{c['true']} {c['true_name']}", f"{c['predicted']} {c['predicted_name']}", str(c["count"]),
             pct(c["percent"])] for c in top_confusions(m.confusion["matrix"], names, k=10)]  # fmt: skip
    lines += markdown_table(["true", "predicted", "samples", "% of true class"], rows)
    lines += ["", f"![confusion]({CONFUSION_PNG})", "", f"![per-class accuracy]({CLASS_ACC_PNG})", ""]
    return lines


def plot_class_metrics(m: RunMetrics, out: Path) -> None:
    """confusion.png and class_accuracy.png when the run recorded per-class counts."""
    from sdlora_dist.class_metrics import plot_class_accuracy, plot_confusion

    if m.per_class is None or m.confusion is None:
        return
    names = list(m.info.get("class_names", []))
    per_task = [r.classes for r in m.tasks]
    plot_confusion(m.confusion["matrix"], names, per_task, out / CONFUSION_PNG, figure)
    plot_class_accuracy(m.per_class["accuracy"][-1], per_task, out / CLASS_ACC_PNG, figure)


# ---------------------------------------------------------------------------------------------------------------------
# Entry


def check_out_dir(out_dir: Path, allowed: tuple[str, ...] = REPORT_FILES) -> None:
    """The report folder is replaced as a whole: refuse one that holds anything a report did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a folder for the report")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in allowed)
        if foreign:
            raise UserError(
                f"--out {out_dir} holds files a report did not write ({', '.join(foreign[:5])}); the report folder "
                "is replaced as a whole, so pass a new or empty folder"
            )


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Write the plots and report.md of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``), atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display; the plots below use the object API, this only guards stray pyplot use
    run_dir = Path(run_dir)
    metrics = load_run_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    check_out_dir(out_dir)
    title = str(metrics.info.get("benchmark") or run_dir.resolve().name)

    def fill(tmp: Path) -> None:
        plot_accuracy_matrix(metrics.matrix, tmp / MATRIX_PNG)
        plot_accuracy_curve(metrics.accuracy["top1_curve"], task_mean_curve(metrics.matrix), tmp / CURVE_PNG)
        plot_magnitudes(metrics.tasks, tmp / MAGNITUDES_PNG)
        plot_time_per_task(metrics.tasks, tmp / TIME_PNG)
        plot_class_metrics(metrics, tmp)
        (tmp / MARKDOWN_FILE).write_text(render_markdown(metrics, title))

    try:
        atomic_dir(out_dir, fill)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out_dir} ({exc.strerror or exc}); pass another --out") from exc
    names = (MATRIX_PNG, CURVE_PNG, MAGNITUDES_PNG, TIME_PNG, CONFUSION_PNG, CLASS_ACC_PNG)
    images = {name: out_dir / name for name in names if (out_dir / name).is_file()}
    return ReportFiles(out_dir=out_dir, markdown=out_dir / MARKDOWN_FILE, images=images)
