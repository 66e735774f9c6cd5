"""``sdlora report RUN_DIR``: plots and a Markdown summary of a run's metrics.json.

Reads only what ``sdlora train`` wrote (metrics.json, and config.yaml / run.json when present) and writes, into one
folder that is filled under a temporary name and renamed into place::

    report/
      accuracy_matrix.png   accuracy on each task group (columns) after each task (rows); unseen groups empty
      accuracy_curve.png    top-1 over all seen classes after each task, and the mean of the per-task accuracies
      magnitudes.png        each frozen direction's alpha over the tasks that followed (the paper's Fig. 3 view)
      time_per_task.png     seconds per task, stacked: train / eval / consolidate / checkpoint
      report.md             summary metrics, the matrix, KD/RR decisions per task, the images linked relatively

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot global state, no display needed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir

REPORT_DIR = "report"
MARKDOWN_FILE = "report.md"
MATRIX_PNG = "accuracy_matrix.png"
CURVE_PNG = "accuracy_curve.png"
MAGNITUDES_PNG = "magnitudes.png"
TIME_PNG = "time_per_task.png"
REPORT_FILES = (MARKDOWN_FILE, MATRIX_PNG, CURVE_PNG, MAGNITUDES_PNG, TIME_PNG)
TIME_PHASES = ("train", "eval", "consolidate", "checkpoint")  # recipe.run_task's timers, in stacking order
SUMMARY_KEYS = (("acc", "Acc"), ("aaa", "AAA"), ("mean_task_acc", "Mean task acc"), ("forgetting", "Forgetting"))
SUMMARY_KEYS += (("bwt", "BWT"),)
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
    tasks: list[dict[str, Any]]
    info: dict[str, Any]
    config: dict[str, Any]

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
    missing = [k for k in ("matrix", "top1_curve", *(k for k, _ in SUMMARY_KEYS)) if k not in accuracy]
    if not accuracy.get("matrix"):
        raise UserError(f"{path} records no finished task yet: train first (at least one task)")
    if missing:
        raise UserError(f"{path}: 'accuracy' lacks {missing}; the file is damaged or from another tool")
    _check_shapes(path, accuracy, tasks)
    info = ckpt.read_json(run_dir / ckpt.RUN_FILE) if (run_dir / ckpt.RUN_FILE).is_file() else {}
    return RunMetrics(accuracy=accuracy, tasks=tasks, info=info, config=_read_config(run_dir))


def _check_shapes(path: Path, accuracy: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
    n = len(accuracy["matrix"])
    if any(not isinstance(row, list) or len(row) != n for row in accuracy["matrix"]):
        raise UserError(f"{path}: the accuracy matrix is not {n} x {n}; the file is damaged")
    if len(accuracy["top1_curve"]) != n:
        raise UserError(f"{path}: top1_curve has {len(accuracy['top1_curve'])} values for {n} tasks; damaged")
    if len(tasks) != n or any(not isinstance(t, dict) or "magnitudes" not in t for t in tasks):
        raise UserError(f"{path}: {len(tasks)} task records for {n} matrix rows; the file is damaged")


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


def closing_decisions(tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Task key -> the consolidation decision that closed its pair (recorded at the start of the next task)."""
    out = {}
    for record in tasks:
        decision = record.get("consolidation_of_previous")
        if decision:
            out[decision["task"]] = decision
    return out


def magnitude_series(tasks: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Frozen direction key -> (after-task indices, alpha values per slot) from the task it was frozen on.

    A task's alpha while its pair is still open scales the unnormalised ``B_t A_t`` (paper section 3), so it is
    in other units than the alpha of a frozen unit direction; only the frozen values are plotted as a series.
    """
    frozen: set[str] = set()
    series: dict[str, tuple[list[int], list[list[float]]]] = {}
    for t, record in enumerate(tasks):
        decision = record.get("consolidation_of_previous")
        if decision and decision.get("action") == "frozen":
            frozen.add(decision["task"])
        for key, values in record["magnitudes"].items():
            if key in frozen:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(t)
                ys.append([float(v) for v in values])
    return series


def open_magnitudes(tasks: list[dict[str, Any]]) -> list[tuple[int, str, list[float]]]:
    """(task index, key, alpha values) of the pair each task trained, read at the end of that task."""
    closed = closing_decisions(tasks)
    out = []
    for t, record in enumerate(tasks):
        frozen_before = {k for k, d in closed.items() if d.get("action") == "frozen" and _key_index(k) < t}
        current = [k for k in record["magnitudes"] if k not in frozen_before]
        if current:
            key = max(current, key=_key_index)
            out.append((t, key, [float(v) for v in record["magnitudes"][key]]))
    return out


def magnitude_slots(tasks: list[dict[str, Any]]) -> int:
    """Values per task magnitude: 1 when shared, 2 x adapted blocks when per_layer."""
    return max((len(v) for r in tasks for v in r["magnitudes"].values()), default=1)


def _key_index(key: str) -> int:
    """``task_03`` -> 3 (keys are written by the model as task_XX)."""
    try:
        return int(key.rsplit("_", 1)[-1])
    except ValueError:
        return -1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _finish_accuracy_plot(
    fig: Any, ax: Any, xs: list[int], ylabel: str, title: str, path: Path, **legend: Any
) -> None:
    """Axes of an accuracy-over-tasks plot (at most about 20 ticks, 0-105 %), legend lower left, saved to ``path``."""
    ax.set_xticks(xs if len(xs) <= 25 else xs[:: max(1, len(xs) // 20)])
    ax.set_ylim(0, 105)
    ax.set_xlabel("after training task t")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", **legend)
    fig.savefig(path)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_accuracy_matrix(matrix: list[list[float | None]], path: Path) -> None:
    """Heatmap of the accuracy matrix, values annotated, unseen cells left empty."""
    import numpy as np

    n = len(matrix)
    grid = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in matrix], float))
    size = min(14.0, 2.5 + 0.6 * n)
    fig = _figure(size + 1.2, size)
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
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.plot(xs, top1, marker="o", label="top-1 over seen classes (Acc at each step)")
    ax.plot(xs, task_mean, marker="s", linestyle="--", label="mean of per-task accuracies")
    for x, y in zip(xs, top1, strict=True):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _finish_accuracy_plot(fig, ax, xs, "accuracy (%)", "Accuracy over tasks", path, fontsize=8)


def plot_magnitudes(tasks: list[dict[str, Any]], path: Path) -> None:
    """Left: each frozen direction's alpha after every later task (Fig. 3); right: each open pair's final alpha."""
    from matplotlib.ticker import MaxNLocator

    series = magnitude_series(tasks)
    opened = open_magnitudes(tasks)
    slots = magnitude_slots(tasks)
    per_slot = f" (mean over {slots} per-layer slots, band = min..max)" if slots > 1 else ""
    fig = _figure(11.0, 4.4)
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


def plot_time_per_task(tasks: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars of seconds per phase for each task, total written above each bar."""
    phases = list(TIME_PHASES) + sorted({k for r in tasks for k in r.get("time_s", {})} - set(TIME_PHASES))
    xs = list(range(len(tasks)))
    fig = _figure(max(6.4, 0.35 * len(tasks) + 2.0), 4.2)
    ax = fig.add_subplot()
    bottom = [0.0] * len(tasks)
    for phase in phases:
        heights = [float(r.get("time_s", {}).get(phase, 0.0)) for r in tasks]
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


def _pct(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _run_lines(m: RunMetrics) -> list[str]:
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
    worlds = sorted({r.get("world_size") for r in m.tasks if r.get("world_size") is not None})
    if worlds:
        lines.append(f"- world size: {', '.join(str(w) for w in worlds)}")
    return lines


def _decision_rows(m: RunMetrics) -> list[list[str]]:
    closed = closing_decisions(m.tasks)
    own = {t: (key, vals) for t, key, vals in open_magnitudes(m.tasks)}
    rows = []
    for t, record in enumerate(m.tasks):
        key, alpha = own.get(t, (f"task_{t:02d}", []))
        decision = closed.get(key)
        if decision is None:
            outcome = "open (last task)" if t == len(m.tasks) - 1 else "?"
        else:
            outcome = decision["action"]
        residual = decision.get("relative_residual") if decision else None
        seconds = sum(float(v) for v in record.get("time_s", {}).values())
        loss = record.get("train", {}).get("final_loss")
        rows.append(
            [
                str(t),
                str(record.get("classes", "")),
                str(record.get("rank", "")),
                f"{_mean(alpha):.4f}" if alpha else "",
                outcome,
                "" if residual is None else f"{residual:.3g}",
                "" if loss is None else f"{loss:.4f}",
                f"{seconds:.1f}",
            ]
        )
    return rows


def render_markdown(m: RunMetrics, title: str) -> str:
    """The report's Markdown text; images are linked relatively (they sit beside report.md)."""
    acc = m.accuracy
    n = m.num_tasks
    lines = [f"# SD-LoRA run report: {title}", "", *_run_lines(m), "", "## Summary (%)", ""]
    lines += _table([label for _, label in SUMMARY_KEYS], [[_pct(acc[k]) for k, _ in SUMMARY_KEYS]])
    lines += ["", "Acc: top-1 over all seen classes after the last task; AAA: mean of that over tasks; "]
    lines[-1] += "forgetting and BWT over the groups before the last."
    lines += ["", "## Accuracy matrix (%)", "", "Row t: after training task t; column j: the classes of task j.", ""]
    header = ["after task", *[f"task {j}" for j in range(n)], "top-1 seen", "task mean"]
    means = task_mean_curve(m.matrix)
    rows = [
        [str(t), *[_pct(v) for v in row], _pct(acc["top1_curve"][t]), _pct(means[t])] for t, row in enumerate(m.matrix)
    ]
    lines += _table(header, rows)
    lines += ["", f"![accuracy matrix]({MATRIX_PNG})", "", f"![accuracy curve]({CURVE_PNG})", ""]
    lines += ["## Tasks: rank (RR), magnitude, consolidation (KD)", ""]
    lines += ["How each task's pair was closed: `frozen` = kept as a new past direction, `absorbed` = KD folded it"]
    lines[-1] += " into the past directions (relative residual below the threshold), `kept` = lora-seq's single pair."
    lines += [""]
    header = ["task", "classes", "rank", "own alpha at end", "pair closed as", "KD residual", "final loss", "time (s)"]
    lines += _table(header, _decision_rows(m))
    lines += ["", f"![magnitudes]({MAGNITUDES_PNG})", ""]
    if (slots := magnitude_slots(m.tasks)) > 1:
        lines += [f"Per-layer magnitudes ({slots} slots per task): the plot shows each task's mean, band min..max."]
        lines += [""]
    lines += [f"![time per task]({TIME_PNG})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Entry


def _check_out_dir(out_dir: Path, allowed: tuple[str, ...] = REPORT_FILES) -> None:
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
    _check_out_dir(out_dir)
    title = str(metrics.info.get("benchmark") or run_dir.resolve().name)

    def fill(tmp: Path) -> None:
        plot_accuracy_matrix(metrics.matrix, tmp / MATRIX_PNG)
        plot_accuracy_curve(metrics.accuracy["top1_curve"], task_mean_curve(metrics.matrix), tmp / CURVE_PNG)
        plot_magnitudes(metrics.tasks, tmp / MAGNITUDES_PNG)
        plot_time_per_task(metrics.tasks, tmp / TIME_PNG)
        (tmp / MARKDOWN_FILE).write_text(render_markdown(metrics, title))

    try:
        atomic_dir(out_dir, fill)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out_dir} ({exc.strerror or exc}); pass another --out") from exc
    images = {name: out_dir / name for name in (MATRIX_PNG, CURVE_PNG, MAGNITUDES_PNG, TIME_PNG)}
    return ReportFiles(out_dir=out_dir, markdown=out_dir / MARKDOWN_FILE, images=images)


# ---------------------------------------------------------------------------------------------------------------------
# Several runs of one setting (the paper reports the mean of several seeds)

AGGREGATE_MARKDOWN = "report.md"
AGGREGATE_CURVES_PNG = "accuracy_curves.png"
AGGREGATE_JSON = "aggregate.json"
AGGREGATE_FILES = (AGGREGATE_MARKDOWN, AGGREGATE_CURVES_PNG, AGGREGATE_JSON)
AGGREGATE_KEYS = (("acc", "Acc"), ("aaa", "AAA"), ("forgetting", "Forgetting"), ("mean_task_acc", "Mean task acc"))
AGGREGATE_KEYS += (("bwt", "BWT"),)
# keys that differ between the runs of one setting by design: the seeds (model init, data order, class order) and
# where the run lives
SEED_KEYS = ("train.seed", "data.class_order_seed", "data.class_order", "run_dir")
# keys that do not change a run's numbers (the data stream is the same for any worker count; checkpoints and the
# process-group timeout only matter when a run fails), so a seed resumed on another machine still belongs; the shard
# path may differ too (one shard set per class order when the order was fixed at prepare time, or a copy on another
# disk): the benchmark and the task split, compared below, say whether the data is the same
RUN_ONLY_KEYS = ("data.num_workers", "train.checkpoint_every", "train.timeout_s", "data.shards")


@dataclass
class RunSet:
    """Finished runs of one setting, in the order given, with the keys they are allowed to differ in."""

    runs: list[Path]
    metrics: list[RunMetrics]
    varying: dict[str, list[Any]]  # seed key -> value per run, only keys whose value differs or is set

    @property
    def num_tasks(self) -> int:
        """Tasks evaluated in every run (checked equal)."""
        return self.metrics[0].num_tasks


def expand_run_args(args: list[str]) -> list[Path]:
    """Run directories from arguments that may be globs (``'runs/ir5-seed*'``), in sorted order per argument.

    Folders that hold an aggregate report (``aggregate.json``, no ``metrics.json``) are left out of a glob, so the
    default output folder beside the runs does not break the next ``sdlora report 'runs/*'``.
    """
    import glob

    runs: list[Path] = []
    for arg in args:
        if glob.has_magic(arg):
            matches = [Path(p) for p in sorted(glob.glob(arg)) if Path(p).is_dir()]
            matches = [p for p in matches if (p / ckpt.METRICS_FILE).is_file() or not (p / AGGREGATE_JSON).is_file()]
            if not matches:
                raise UserError(f"{arg!r} matches no run directory; pass run directories written by 'sdlora train'")
            runs += matches
        else:
            runs.append(Path(arg))
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    if len(unique) != len(runs):
        raise UserError("the same run directory is named twice; pass each run once")
    return runs


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.01}}`` -> ``{"train.lr": 0.01}`` (lists are values, not sections)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "kwargs":
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _setting(m: RunMetrics) -> dict[str, Any]:
    """What must be equal across the runs of one setting: the config minus seeds and run-only keys, the split."""
    flat = {k: v for k, v in flat_config(m.config).items() if k not in SEED_KEYS and k not in RUN_ONLY_KEYS}
    flat["tasks evaluated"] = m.num_tasks
    flat["classes per task"] = [r.get("classes") for r in m.tasks]
    if m.info.get("benchmark") is not None:
        flat["benchmark (run.json)"] = m.info["benchmark"]
    return flat


def _differences(runs: list[Path], settings: list[dict[str, Any]]) -> list[str]:
    """``key (RUN_A: x, RUN_B: y)`` for every key whose value is not the same in all runs."""
    out = []
    for key in sorted(set().union(*settings)):
        values = [s.get(key, "<absent>") for s in settings]
        odd = next((i for i, v in enumerate(values) if v != values[0]), None)
        if odd is not None:
            out.append(f"{key} ({runs[0]}: {values[0]!r}, {runs[odd]}: {values[odd]!r})")
    return out


def load_run_set(runs: list[Path]) -> RunSet:
    """Every run's metrics and config; UserError naming the keys when the runs are not of one setting."""
    if len(runs) < 2:
        raise UserError("aggregating needs at least two runs of one setting (one run: 'sdlora report RUN_DIR')")
    metrics = [load_run_metrics(r) for r in runs]
    for run, m in zip(runs, metrics, strict=True):
        if not m.config:
            raise UserError(
                f"{run} has no {ckpt.CONFIG_FILE}, so it cannot be shown to share a setting with the other runs; "
                "aggregate runs written by 'sdlora train'"
            )
    counts = [m.num_tasks for m in metrics]
    if len(set(counts)) > 1:
        short = runs[counts.index(min(counts))]
        raise UserError(
            f"the runs evaluated different numbers of tasks ({', '.join(map(str, counts))}): {short} is not finished "
            f"('sdlora train --resume {short}') or is another setting; aggregate finished runs of one setting"
        )
    diffs = _differences(runs, [_setting(m) for m in metrics])
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(
            f"the runs are not of one setting, they differ in {shown}; only {', '.join(SEED_KEYS)} may differ: "
            "report each setting on its own"
        )
    varying = {}
    for key in SEED_KEYS[:-1]:
        values = [flat_config(m.config).get(key) for m in metrics]
        if any(v is not None for v in values):
            varying[key] = values
    return RunSet(runs=runs, metrics=metrics, varying=varying)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate_numbers(rs: RunSet) -> dict[str, Any]:
    """Per-run summary values, their mean and std, and the top-1 curve's mean and std (aggregate.json)."""
    per_run = [{k: float(m.accuracy[k]) for k, _ in AGGREGATE_KEYS} for m in rs.metrics]
    summary = {}
    for key, _ in AGGREGATE_KEYS:
        mean, std = mean_std([r[key] for r in per_run])
        summary[key] = {"mean": mean, "std": std}
    curves = [[float(v) for v in m.accuracy["top1_curve"]] for m in rs.metrics]
    curve = [mean_std(list(col)) for col in zip(*curves, strict=True)]
    return {
        "runs": [str(r) for r in rs.runs],
        "varying": rs.varying,
        "per_run": per_run,
        "summary": summary,
        "top1_curves": curves,
        "top1_mean": [m for m, _ in curve],
        "top1_std": [s for _, s in curve],
    }


def plot_accuracy_curves(numbers: dict[str, Any], labels: list[str], path: Path) -> None:
    """Every run's top-1 curve (thin) and their mean with a ±1 std band (thick), on one axis."""
    curves, mean, std = numbers["top1_curves"], numbers["top1_mean"], numbers["top1_std"]
    xs = list(range(len(mean)))
    fig = _figure(7.2, 4.4)
    ax = fig.add_subplot()
    for curve, label in zip(curves, labels, strict=True):
        ax.plot(xs, curve, marker=".", linewidth=1.0, alpha=0.7, label=label)
    ax.plot(xs, mean, color="black", linewidth=2.2, label=f"mean of {len(curves)} runs")
    low = [m - s for m, s in zip(mean, std, strict=True)]
    high = [m + s for m, s in zip(mean, std, strict=True)]
    ax.fill_between(xs, low, high, color="black", alpha=0.12, label="mean ± std")
    title = "Accuracy over tasks, every run and their mean"
    _finish_accuracy_plot(fig, ax, xs, "top-1 over seen classes (%)", title, path, fontsize=7,
                          ncol=2 if len(curves) > 6 else 1)  # fmt: skip


def run_labels(rs: RunSet) -> list[str]:
    """A short label per run: its folder name plus the seed values it differs in."""
    labels = []
    for i, run in enumerate(rs.runs):
        seeds = ", ".join(f"{k.split('.')[-1]} {v[i]}" for k, v in rs.varying.items() if v[i] is not None)
        labels.append(f"{run.name} ({seeds})" if seeds else run.name)
    return labels


def aggregate_table(rs: RunSet, numbers: dict[str, Any]) -> list[str]:
    """Markdown rows: one per run, then mean ± std (the table printed and written to report.md)."""
    header = ["run", *[label for _, label in AGGREGATE_KEYS]]
    pairs = zip(run_labels(rs), numbers["per_run"], strict=True)
    rows = [[label, *[_pct(r[k]) for k, _ in AGGREGATE_KEYS]] for label, r in pairs]
    s = numbers["summary"]
    cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k, _ in AGGREGATE_KEYS]
    rows.append([f"**mean ± std ({len(rs.runs)} runs)**", *cells])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_aggregate(rs: RunSet, numbers: dict[str, Any]) -> str:
    """The aggregate report's Markdown: setting, per-run and mean ± std table, the mean curve, the plot."""
    first = rs.metrics[0]
    title = str(first.info.get("benchmark") or first.config["data"]["benchmark"])
    setting = [ln for ln in _run_lines(first)[1:] if not ln.startswith("- config hash")]  # the hash holds the seed
    lines = [f"# SD-LoRA: {len(rs.runs)} runs of one setting: {title}", "", *setting]
    lines += [f"- tasks: {rs.num_tasks}, classes per task: {[r.get('classes') for r in first.tasks]}"]
    lines += [f"- runs differ only in: {', '.join(rs.varying) or 'nothing recorded (same seeds)'}", ""]
    lines += ["## Summary (%)", "", *aggregate_table(rs, numbers), ""]
    lines += ["Mean and sample standard deviation (n - 1) over the runs. Acc: top-1 over all seen classes after the"]
    lines[-1] += " last task; AAA: mean of that over tasks; forgetting and BWT over the groups before the last."
    lines += [""]
    lines += ["## Top-1 over seen classes after each task (%)", ""]
    header = ["after task", *run_labels(rs), "mean", "std"]
    rows = [
        [
            str(t),
            *[_pct(c[t]) for c in numbers["top1_curves"]],
            _pct(numbers["top1_mean"][t]),
            _pct(numbers["top1_std"][t]),
        ]
        for t in range(rs.num_tasks)
    ]
    lines += _table(header, rows)
    lines += ["", f"![accuracy curves]({AGGREGATE_CURVES_PNG})", ""]
    return "\n".join(lines)


def _default_aggregate_out(rs: RunSet) -> Path:
    parents = [r.resolve().parent for r in rs.runs]
    common = Path(os.path.commonpath([str(p) for p in parents]))
    first = rs.metrics[0]
    return common / f"report-{first.info.get('benchmark') or first.config['data']['benchmark']}"


def write_aggregate_report(run_args: list[str], out_dir: str | Path | None = None) -> tuple[ReportFiles, str]:
    """Aggregate finished runs of one setting into ``out_dir`` (default: ``report-<benchmark>`` beside the runs).

    Returns the files and the summary table (Markdown) for the console. The folder is written atomically.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    rs = load_run_set(expand_run_args(run_args))
    numbers = aggregate_numbers(rs)
    out = Path(out_dir) if out_dir is not None else _default_aggregate_out(rs)
    _check_out_dir(out, AGGREGATE_FILES)

    def fill(tmp: Path) -> None:
        plot_accuracy_curves(numbers, run_labels(rs), tmp / AGGREGATE_CURVES_PNG)
        (tmp / AGGREGATE_MARKDOWN).write_text(render_aggregate(rs, numbers))
        (tmp / AGGREGATE_JSON).write_text(json.dumps(numbers, indent=1) + "\n")

    try:
        atomic_dir(out, fill)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out} ({exc.strerror or exc}); pass another --out") from exc
    images = {AGGREGATE_CURVES_PNG: out / AGGREGATE_CURVES_PNG}
    files = ReportFiles(out_dir=out, markdown=out / AGGREGATE_MARKDOWN, images=images, data=[out / AGGREGATE_JSON])
    return files, "\n".join(aggregate_table(rs, numbers))
