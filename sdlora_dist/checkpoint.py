"""Run-directory schema, atomic writes, and loading a run back.

::

    RUN_DIR/
      config.yaml                 resolved config (CONFIG_FILE)
      run.json                    config hash, benchmark, shards path, class names, package version (RUN_FILE)
      backbone.safetensors        frozen base weights W0, written once (BACKBONE_FILE)
      tasks/task_003/             one folder per completed task, renamed into place when complete
        adapters.safetensors      every non-frozen-base tensor: factors, magnitudes, head (ADAPTERS_FILE)
        layout.json               model.layout(): tasks, ranks, frozen/current keys, KD/RR decisions
        progress.json             recipe progress: accuracy row, timings, magnitudes (kept apart from weights)
        head_stats.safetensors    train.head_align=gaussian only: this task's class statistics (HEAD_STATS_FILE)
      engine/                     mid-task DeepSpeed checkpoints (recipe-owned)
      metrics.json, metrics.csv   the accuracy matrix and summary metrics

``backbone.safetensors`` plus ``adapters.safetensors`` together are exactly ``model.state_dict()``. Writes go to a
temporary sibling and are renamed into place: a killed process never leaves a folder ``--resume`` would load.
Saving never mutates the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdlora_dist import __version__
from sdlora_dist.config import Config, load_config, save_config
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir, atomic_write_json

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
BACKBONE_FILE = "backbone.safetensors"
TASKS_DIR = "tasks"
ADAPTERS_FILE = "adapters.safetensors"
LAYOUT_FILE = "layout.json"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.json"
HEAD_STATS_FILE = "head_stats.safetensors"  # issue 13 (head_align.py)


def task_dir_name(task: int) -> str:
    """Folder of task ``task``'s checkpoint (``task_003``)."""
    return f"task_{task:03d}"


def _is_base_key(key: str) -> bool:
    """Frozen pre-trained weights: backbone tensors that are not adapter factors."""
    return key.startswith("backbone.") and ".lora_" not in key


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen pre-trained weights W0 of ``model.state_dict()``, on CPU (written once per run)."""
    return _contiguous_cpu({k: v for k, v in model.state_dict().items() if _is_base_key(k)})


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything in ``model.state_dict()`` except W0 (factors, magnitudes, head), on CPU; W0 is never copied."""
    return _contiguous_cpu({k: v for k, v in model.state_dict().items() if not _is_base_key(k)})


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def check_writable(run_dir: str | Path) -> Path:
    """Create ``run_dir`` if needed and prove it is writable (UserError otherwise)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".probe", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"run directory {run_dir} is not writable ({exc.strerror}); pass another --run-dir") from exc
    return run_dir


def write_run_header(run_dir: Path, cfg: Config, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Write config.yaml, run.json and the frozen backbone (once per run)."""
    save_config(cfg, run_dir / CONFIG_FILE)
    header = {"config_hash": cfg.hash(), "version": __version__, **info}
    atomic_write_json(run_dir / RUN_FILE, header)
    if not (run_dir / BACKBONE_FILE).exists():
        _atomic_safetensors(run_dir / BACKBONE_FILE, base_state(model))


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_task_checkpoint(
    run_dir: Path,
    task: int,
    model: Any,
    progress: dict[str, Any],
    *,
    head_stats: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``tasks/task_XXX`` atomically: adapter tensors, layout, recipe progress (+ head statistics).

    Returns the folder.
    """
    rest = adapter_state(model)
    layout = model.layout()

    def fill(tmp: Path) -> None:
        save_file(rest, str(tmp / ADAPTERS_FILE))
        (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2))
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        if head_stats is not None:  # issue 13: inside the folder's atomic rename, so resume never misses them
            save_head_stats(tmp, head_stats)

    final = run_dir / TASKS_DIR / task_dir_name(task)
    atomic_dir(final, fill)
    return final


def save_head_stats(folder: Path, stats: dict[str, torch.Tensor]) -> None:
    """Write head_align's statistics of one task into (the temporary copy of) its task folder (issue 13)."""
    save_file(_contiguous_cpu(stats), str(folder / HEAD_STATS_FILE))


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_head_stats(run_dir: str | Path, task: int) -> dict[str, torch.Tensor] | None:
    """head_align's statistics of ``task`` (None when the task was trained without them; issue 13)."""
    path = Path(run_dir) / TASKS_DIR / task_dir_name(task) / HEAD_STATS_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); the run directory is damaged") from exc


def completed_tasks(run_dir: str | Path) -> list[int]:
    """Indices of tasks whose checkpoint folder is complete (renamed into place), ascending."""
    tasks_dir = Path(run_dir) / TASKS_DIR
    if not tasks_dir.is_dir():
        return []
    done = []
    for child in tasks_dir.iterdir():
        if child.name.startswith("task_") and (child / PROGRESS_FILE).is_file():
            done.append(int(child.name.split("_")[1]))
    return sorted(done)


def read_json(path: Path) -> Any:
    """Read JSON with a readable error naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{path} is missing: is this a run directory written by 'sdlora train'?") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}); the run directory is damaged") from exc


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}: not a run directory written by 'sdlora train'")
    return load_config(path)


def load_task_model(run_dir: str | Path, task: int, cfg: Config | None = None) -> Any:
    """Rebuild the model exactly as it was after ``task`` (weights, layout, trainable flags)."""
    from sdlora_dist.model import SDLoRAViT, build_backbone

    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    folder = run_dir / TASKS_DIR / task_dir_name(task)
    layout = read_json(folder / LAYOUT_FILE)
    model_cfg = type(cfg.model)(name=cfg.model.name, weights="random", kwargs=dict(cfg.model.kwargs))
    model = SDLoRAViT(build_backbone(model_cfg), cfg.adapter, method=cfg.train.method)
    model.restore_layout(layout)
    try:
        state = {**load_file(str(run_dir / BACKBONE_FILE)), **load_file(str(folder / ADAPTERS_FILE))}
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot read the weights of {folder} ({exc}); the run directory is damaged") from exc
    model.load_weights(state)
    return model


@dataclass
class RunState:
    """A finished (or partly finished) run, loaded for export and evaluation."""

    run_dir: Path
    config: Config
    model: Any
    class_names: list[str]
    config_hash: str
    num_tasks_done: int
    shards: str | None
    info: dict[str, Any]


def load_run(run_dir: str | Path) -> RunState:
    """The model after the newest completed task, with what export and evaluation need."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass --run RUN_DIR of a 'sdlora train' run")
    cfg = load_run_config(run_dir)
    done = completed_tasks(run_dir)
    if not done:
        raise UserError(f"run {run_dir} has no completed task yet; train at least one task before exporting")
    info = read_json(run_dir / RUN_FILE)
    model = load_task_model(run_dir, done[-1], cfg)
    seen = sum(model.task_classes)
    names = list(info.get("class_names", []))[:seen] or [str(i) for i in range(seen)]
    return RunState(
        run_dir=run_dir,
        config=cfg,
        model=model,
        class_names=names,
        config_hash=info.get("config_hash", cfg.hash()),
        num_tasks_done=len(done),
        shards=info.get("shards"),
        info=info,
    )


def find_latest_run(root: str | Path = "runs") -> Path:
    """The most recently modified run under ``root`` with at least one completed task."""
    root = Path(root)
    candidates = [p for p in root.glob("*") if p.is_dir() and completed_tasks(p)] if root.is_dir() else []
    if not candidates:
        raise UserError(f"no run with a completed task under {root}/; train first or pass --run RUN_DIR")
    return max(candidates, key=lambda p: max((p / TASKS_DIR).iterdir(), key=os.path.getmtime).stat().st_mtime)
