"""The model card written beside every export: what the model is, what it was trained on, how well, and its limits.

Markdown, read from the run directory only (metrics.json, run.json, config.yaml) and the export's own metadata, so
the card states the same numbers ``sdlora report`` shows. timm folders get ``README.md`` (the Hugging Face
convention); an ``.onnx`` file gets ``<stem>.README.md`` beside it, so two exports in one folder keep their cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora_dist.checkpoint import RunState
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_write_text
from sdlora_dist.report import RunMetrics, load_run_metrics, markdown_table, pct


def card_path(export_path: Path) -> Path:
    """Where the card of ``export_path`` goes: ``DIR/README.md`` for a folder, ``STEM.README.md`` for a file."""
    if export_path.is_dir():
        return export_path / "README.md"
    return export_path.with_name(f"{export_path.stem}.README.md")


def _class_rows(state: RunState) -> list[list[str]]:
    rows, start = [], 0
    for task, n in enumerate(state.model.task_classes):
        names = state.class_names[start : start + n]
        shown = ", ".join(names[:8]) + (f", ... ({n} in all)" if n > 8 else "")
        rows.append([str(task), f"{start}-{start + n - 1}", shown])
        start += n
    return rows


def _accuracy_lines(m: RunMetrics | None) -> list[str]:
    if m is None:
        return ["Not recorded: the run directory has no metrics.json."]
    acc = m.accuracy
    lines = markdown_table(["Acc", "AAA", "forgetting", "BWT"],
                           [[pct(acc["acc"]), pct(acc["aaa"]), pct(acc["forgetting"]), pct(acc["bwt"])]])  # fmt: skip
    lines += ["", "Row t: after training task t; column j: the classes of task j.", ""]
    lines += markdown_table(["after task", *[f"task {j}" for j in range(m.num_tasks)]],
                            [[str(t), *[pct(v) for v in row]] for t, row in enumerate(m.matrix)])  # fmt: skip
    return lines


def render_card(state: RunState, metadata: dict[str, Any], files: dict[str, str]) -> str:
    """The card's Markdown for the run ``state`` exported as ``files`` (label -> file name)."""
    try:
        m = load_run_metrics(state.run_dir)
    except UserError:  # a run directory without metrics.json (assembled by hand): the card says so
        m = None
    cfg = state.config
    lines = [f"# {cfg.model.name} + SD-LoRA, {len(state.class_names)} classes in {state.model.num_tasks} tasks", ""]
    lines += ["Class-incremental classifier trained with SD-LoRA (sdlora-dist) and merged into a plain timm ViT: "]
    lines[-1] += "one forward pass, no adapters at inference."
    lines += ["", "## Files", ""] + [f"- `{name}`: {label}" for label, name in files.items()]
    lines += ["", "## Classes per task", ""]
    lines += markdown_table(["task", "labels", "classes"], _class_rows(state))
    lines += ["", "## Accuracy (%, the run's test split)", ""] + _accuracy_lines(m)
    lines += ["", "## Preprocessing", ""]
    lines += [f"RGB, resize (interpolation {metadata['interpolation']}, crop_pct {metadata['crop_pct']}) and center "
              f"crop to {metadata['input_size'][1]}x{metadata['input_size'][2]}, scale to [0, 1], normalise with "
              f"mean {tuple(metadata['mean'])} and std {tuple(metadata['std'])}; NCHW float32."]  # fmt: skip
    lines += ["", "## Lineage", ""]
    lines += [f"- run: `{state.run_dir}` (config hash `{state.config_hash}`, {state.num_tasks_done} task(s))",
              f"- data: benchmark `{state.info.get('benchmark', cfg.data.benchmark)}`, shards `{state.shards}`",
              f"- class order / split fingerprint: `{(state.info.get('task_split') or {}).get('fingerprint', 'n/a')}`",
              f"- pre-trained weights: {metadata.get('weights') or cfg.model.weights or 'timm default'}",
              f"- method: `{cfg.train.method}`, adapter rank {cfg.adapter.rank}, seed {cfg.train.seed}"]  # fmt: skip
    lines += ["", "## Intended use and known limits", ""]
    lines += ["- Closed-set classification over exactly the classes above; no out-of-distribution rejection.",
              "- Earlier tasks are forgotten in part" + (f": mean forgetting {pct(m.accuracy['forgetting'])} points, "
              f"BWT {pct(m.accuracy['bwt'])} (per-task rows above)" if m else "") + "; the oldest tasks are usually "
              "the weakest.",
              "- Accuracy is measured on the benchmark's test split only; images far from it (domain, resolution) "
              "can score much lower.",
              "- New classes need a new training task (`sdlora data add-task` + `sdlora train --continue`), not "
              "fine-tuning of this file alone, or earlier classes degrade."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_card(export_path: Path, state: RunState, metadata: dict[str, Any], files: dict[str, str]) -> Path:
    """Write the card of ``export_path`` atomically and return its path."""
    path = card_path(export_path)
    atomic_write_text(path, render_card(state, metadata, files))
    return path
