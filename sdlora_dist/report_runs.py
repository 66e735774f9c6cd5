"""``sdlora report RUN_A RUN_B ...``: mean ± std over finished runs of one setting (the paper reports the mean of
several seeds), refused, naming the keys, when the runs differ in anything but their seeds.

Writes, into one folder filled under a temporary name and renamed into place (default
``report-<benchmark>-<setting hash>`` beside the runs: one folder per setting, the seeds aside)::

    report-digits-1a2b3c4d/
      report.md             the setting, a table per run plus mean ± std, the top-1 curve of every run and the mean
      accuracy_curves.png   every run's top-1 curve and their mean with a ±1 std band
      aggregate.json        the numbers of report.md (per run, mean and std, the curves)

Each run is read as one run's report reads it (:func:`report.load_run_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir
from sdlora_dist.report import (
    SUMMARY_KEYS,
    ReportFiles,
    RunMetrics,
    check_out_dir,
    figure,
    finish_accuracy_plot,
    load_run_metrics,
    markdown_table,
    pct,
    run_lines,
)

AGGREGATE_MARKDOWN = "report.md"
AGGREGATE_CURVES_PNG = "accuracy_curves.png"
AGGREGATE_JSON = "aggregate.json"
AGGREGATE_FILES = (AGGREGATE_MARKDOWN, AGGREGATE_CURVES_PNG, AGGREGATE_JSON)
# keys that differ between the runs of one setting by design: the seeds (model init, data order, class order) and
# where the run lives
SEED_KEYS = ("train.seed", "data.class_order_seed", "data.class_order", "run_dir")
# keys that do not change a run's numbers (the data stream is the same for any worker count; checkpoints and the
# process-group timeout only matter when a run fails), so a seed resumed on another machine still belongs; the shard
# path may differ too (one shard set per class order when the order was fixed at prepare time, or a copy on another
# disk): the benchmark and the task split, compared below, say whether the data is the same
RUN_ONLY_KEYS = (
    "data.num_workers", "train.checkpoint_every", "train.checkpoint_every_s", "train.timeout_s", "data.shards",
)  # fmt: skip
SPLIT_KEYS = ("tasks evaluated", "classes per task")  # from the metrics, compared like config keys


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
    flat[SPLIT_KEYS[0]] = m.num_tasks
    flat[SPLIT_KEYS[1]] = [r.classes for r in m.tasks]
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


def _refuse_differences(runs: list[Path], settings: list[dict[str, Any]]) -> None:
    diffs = _differences(runs, settings)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(
            f"the runs are not of one setting, they differ in {shown}; only {', '.join(SEED_KEYS)} may differ: "
            "report each setting on its own"
        )


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
    settings = [_setting(m) for m in metrics]
    # config keys first: runs of another data.tasks also evaluate another number of tasks, but are not unfinished
    _refuse_differences(runs, [{k: v for k, v in s.items() if k not in SPLIT_KEYS} for s in settings])
    counts = [m.num_tasks for m in metrics]
    if len(set(counts)) > 1:
        short = runs[counts.index(min(counts))]
        raise UserError(
            f"the runs evaluated different numbers of tasks ({', '.join(map(str, counts))}): {short} is not finished "
            f"('sdlora train --resume {short}') or is another setting; aggregate finished runs of one setting"
        )
    _refuse_differences(runs, settings)
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
    per_run = [{k: float(m.accuracy[k]) for k in SUMMARY_KEYS} for m in rs.metrics]
    summary = {}
    for key in SUMMARY_KEYS:
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
    fig = figure(7.2, 4.4)
    ax = fig.add_subplot()
    for curve, label in zip(curves, labels, strict=True):
        ax.plot(xs, curve, marker=".", linewidth=1.0, alpha=0.7, label=label)
    ax.plot(xs, mean, color="black", linewidth=2.2, label=f"mean of {len(curves)} runs")
    low = [m - s for m, s in zip(mean, std, strict=True)]
    high = [m + s for m, s in zip(mean, std, strict=True)]
    ax.fill_between(xs, low, high, color="black", alpha=0.12, label="mean ± std")
    title = "Accuracy over tasks, every run and their mean"
    finish_accuracy_plot(fig, ax, xs, "top-1 over seen classes (%)", title, path, fontsize=7,
                          ncol=2 if len(curves) > 6 else 1)  # fmt: skip


def run_labels(rs: RunSet) -> list[str]:
    """A short label per run: its folder name plus the seed values it differs in."""
    labels = []
    for i, run in enumerate(rs.runs):
        seeds = ", ".join(f"{k.split('.')[-1]} {v[i]}" for k, v in rs.varying.items() if v[i] is not None)
        labels.append(f"{run.name} ({seeds})" if seeds else run.name)
    return labels


def summary_table(rs: RunSet, numbers: dict[str, Any]) -> list[str]:
    """Markdown rows: one per run, then mean ± std (the table printed and written to report.md)."""
    pairs = zip(run_labels(rs), numbers["per_run"], strict=True)
    rows = [[label, *[pct(r[k]) for k in SUMMARY_KEYS]] for label, r in pairs]
    s = numbers["summary"]
    cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in SUMMARY_KEYS]
    rows.append([f"**mean ± std ({len(rs.runs)} runs)**", *cells])
    return markdown_table(["run", *SUMMARY_KEYS.values()], rows, label_column=True)


def render_aggregate(rs: RunSet, numbers: dict[str, Any]) -> str:
    """The aggregate report's Markdown: setting, per-run and mean ± std table, the mean curve, the plot."""
    first = rs.metrics[0]
    title = str(first.info.get("benchmark") or first.config["data"]["benchmark"])
    setting = [ln for ln in run_lines(first)[1:] if not ln.startswith("- config hash")]  # the hash holds the seed
    lines = [f"# SD-LoRA: {len(rs.runs)} runs of one setting: {title}", "", *setting]
    lines += [f"- tasks: {rs.num_tasks}, classes per task: {[r.classes for r in first.tasks]}"]
    lines += [f"- runs differ only in: {', '.join(rs.varying) or 'nothing recorded (same seeds)'}", ""]
    lines += ["## Summary (%)", "", *summary_table(rs, numbers), ""]
    lines += ["Mean and sample standard deviation (n - 1) over the runs. Acc: top-1 over all seen classes after the"]
    lines[-1] += " last task; AAA: mean of that over tasks; forgetting and BWT over the groups before the last."
    lines += [""]
    lines += ["## Top-1 over seen classes after each task (%)", ""]
    header = ["after task", *run_labels(rs), "mean", "std"]
    rows = [
        [
            str(t),
            *[pct(c[t]) for c in numbers["top1_curves"]],
            pct(numbers["top1_mean"][t]),
            pct(numbers["top1_std"][t]),
        ]
        for t in range(rs.num_tasks)
    ]
    lines += markdown_table(header, rows)
    lines += ["", f"![accuracy curves]({AGGREGATE_CURVES_PNG})", ""]
    return "\n".join(lines)


def _default_aggregate_out(rs: RunSet) -> Path:
    parents = [r.resolve().parent for r in rs.runs]
    common = Path(os.path.commonpath([str(p) for p in parents]))
    first = rs.metrics[0]
    benchmark = first.info.get("benchmark") or first.config["data"]["benchmark"]
    # one folder per setting (the seeds aside): aggregating another setting of the benchmark keeps this one
    setting = json.dumps(_setting(first), sort_keys=True, default=str)
    return common / f"report-{benchmark}-{hashlib.sha256(setting.encode()).hexdigest()[:8]}"


def write_aggregate_report(run_args: list[str], out_dir: str | Path | None = None) -> tuple[ReportFiles, str]:
    """Aggregate finished runs of one setting into ``out_dir`` (default: ``report-<benchmark>-<setting hash>``
    beside the runs, so each setting of a benchmark keeps its own folder).

    Returns the files and the summary table (Markdown) for the console. The folder is written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    rs = load_run_set(expand_run_args(run_args))
    numbers = aggregate_numbers(rs)
    out = Path(out_dir) if out_dir is not None else _default_aggregate_out(rs)
    check_out_dir(out, AGGREGATE_FILES)

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
    return files, "\n".join(summary_table(rs, numbers))
