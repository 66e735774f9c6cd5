"""Run-directory schema, atomic writes, and loading a run back.

::

    RUN_DIR/
      config.yaml                 resolved config (CONFIG_FILE)
      run.json                    config hash, benchmark, shards path, class names, package version (RUN_FILE)
      backbone.safetensors        frozen base weights W0, written once (BACKBONE_FILE)
      tasks/task_03/              one folder per completed task (model.task_key), renamed into place when complete
        adapters.safetensors      what this task changed: its own pair's factors and head rows, every magnitude
                                  (ADAPTERS_FILE); frozen factors and closed head rows stay in the folder that
                                  wrote them
        layout.json               model.layout() plus a "checkpoint" block (CHECKPOINT_KEY): "format" (2),
                                  "sources" (group -> task folder holding it; groups are a pair's factors, "task_03",
                                  and a task's head rows, "head.task_03") and "sha256" (file name -> sha256 of this
                                  folder's files, checked on load)
        progress.json             this task's own recipe record and accuracy row (kept apart from weights)
        head_stats.safetensors    train.head_align=gaussian only: this task's class statistics (HEAD_STATS_FILE),
                                  its sha256 in layout.json like the adapters'
      engine/task_03/             mid-task DeepSpeed checkpoints (recipe-owned)
      metrics.json, metrics.csv   the whole accuracy matrix, summary metrics and every task's record

Storage per task is therefore flat in the task count: the frozen factors a task did not change are never copied
(a frozen pair's factors never change, consolidation only sets magnitudes or drops the newest pair, and a closed
task's head rows are frozen). Loading task t
assembles the groups named by its ``sources`` from the earlier folders, each file checked against the
sha256 its folder recorded.

``backbone.safetensors`` plus the assembled tensors are exactly ``model.state_dict()``. Writes go to a temporary
sibling and are renamed into place: a killed process never leaves a folder ``--resume`` would load. Saving never
mutates the model. Only rank 0 writes (:func:`save_task_checkpoint` checks).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sdlora_dist import __version__
from sdlora_dist.config import Config, config_from_dict, read_yaml_mapping, save_config
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, file_sha256
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.metrics import AccuracyLog
from sdlora_dist.model import task_key
from sdlora_dist.records import RunProgress, TaskRecord

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
BACKBONE_FILE = "backbone.safetensors"
TASKS_DIR = "tasks"
ADAPTERS_FILE = "adapters.safetensors"
LAYOUT_FILE = "layout.json"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.json"
METRICS_CSV = "metrics.csv"
HEAD_STATS_FILE = "head_stats.safetensors"  # written by head_align.py


CHECKPOINT_KEY = "checkpoint"  # layout.json block: format, sources, sha256
HEAD_PARTS = ("weight", "bias")  # TaskHead's per-task ParameterDicts
FORMAT = 2  # each folder holds only what its task changed (1, never released: every folder held every tensor)


def task_dir_name(task: int) -> str:
    """Folder of task ``task``'s checkpoint: the model's per-task name (``task_03``), one format for both."""
    return task_key(task)


def task_folder(parent: Path, task: int) -> Path:
    """``parent/task_03``: the folder of task ``task`` under ``parent``."""
    return parent / task_dir_name(task)


def _group_of(name: str) -> str | None:
    """Source group of a per-task tensor that freezes with its task: a pair's factors (``...qkv.lora_A.task_03`` ->
    ``task_03``) or a task's head rows (``head.weight.task_03`` -> ``head.task_03``); None for the magnitudes (every
    task may change them), which each folder therefore holds in full."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3:
        return None
    if parts[1] in ("lora_A", "lora_B"):
        return parts[2]
    return f"head.{parts[2]}" if parts[0] == "head" and parts[1] in HEAD_PARTS else None


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
    from sdlora_dist.logs import log_rank_zero
    from sdlora_dist.preprocess import describe_preprocessing, describe_weights, preprocessing_record

    save_config(cfg, run_dir / CONFIG_FILE)
    loaded = preprocessing_record(model, cfg.data)
    if (run_dir / RUN_FILE).is_file() and not loaded["weights"].get("sha256"):
        # resumed from a checkpoint: W0 comes from BACKBONE_FILE; keep the record of the file loaded at the start
        loaded["weights"] = read_json(run_dir / RUN_FILE).get("weights", loaded["weights"])
    loaded["architecture"] = _architecture(run_dir, cfg, model)
    log_rank_zero(describe_weights(loaded["weights"]) + "\n" + describe_preprocessing(loaded))
    header = {"config_hash": cfg.hash(), "version": __version__, **info, **loaded}
    atomic_write_json(run_dir / RUN_FILE, header)
    if not (run_dir / BACKBONE_FILE).exists():
        _atomic_safetensors(run_dir / BACKBONE_FILE, base_state(model))


def _architecture(run_dir: Path, cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    """run.json's architecture record: kept from the first start (the weights file may be gone on a resume)."""
    from sdlora_dist.weights import architecture_record

    if (run_dir / RUN_FILE).is_file():
        kept = read_json(run_dir / RUN_FILE).get("architecture")
        if kept:
            return kept
    return architecture_record(cfg.model, model.backbone)


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _previous_sources(run_dir: Path, task: int) -> dict[str, str]:
    """Pair key -> folder holding its factors, as recorded by task ``task - 1``'s folder ({} when there is none)."""
    if task == 0:
        return {}
    folder = task_folder(run_dir / TASKS_DIR, task - 1)
    if not (folder / LAYOUT_FILE).is_file():
        return {}
    return dict(read_json(folder / LAYOUT_FILE)[CHECKPOINT_KEY]["sources"])


def tensor_sources(run_dir: Path, task: int, model: Any, *, heads_rewritten: bool = False) -> dict[str, str]:
    """Where each task's factors and head rows are stored once task ``task`` is saved: those already on disk stay
    where they are (a frozen pair never changes, nor do a closed task's head rows); the open pair (trained by every
    task under lora-seq), anything not yet on disk and, when ``heads_rewritten`` (head alignment retrained every
    seen class's row), every head row go here."""
    own = task_dir_name(task)
    previous = _previous_sources(run_dir, task)
    keys = [*model.adapters[0].lora_A, *(f"head.{k}" for k in model.head.weight)]

    def moved(key: str) -> bool:
        return key == model.current_key or key not in previous or (heads_rewritten and key.startswith("head."))

    return {key: own if moved(key) else previous[key] for key in keys}


def save_task_checkpoint(
    run_dir: Path,
    task: int,
    model: Any,
    progress: dict[str, Any],
    *,
    times: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    metrics_csv: str | None = None,
    discard: Path | None = None,
    head_stats: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """On rank 0, write ``tasks/task_XX`` atomically (this task's tensors, layout, ``progress``), then the run's
    metrics files, then remove ``discard`` (the task's engine checkpoints). Other ranks return None at once.
    ``head_stats`` (head_align's class statistics) go inside the folder, so a resumed run never misses them; their
    presence means alignment rewrote every seen class's head row, so all head rows are stored here.

    ``times`` (the caller's per-phase timings, also referenced by ``progress`` and ``metrics``) gets
    ``times["checkpoint"]``: the seconds spent up to writing the JSON, so every file is written once.
    """
    if not is_rank_zero():
        return None
    start = time.perf_counter()
    run_dir = Path(run_dir)
    sources = tensor_sources(run_dir, task, model, heads_rewritten=head_stats is not None)
    own = task_dir_name(task)
    tensors = {k: v for k, v in adapter_state(model).items() if sources.get(_group_of(k) or "", own) == own}
    layout = model.layout()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTERS_FILE))
        checks = {ADAPTERS_FILE: file_sha256(tmp / ADAPTERS_FILE)}
        if head_stats is not None:
            save_head_stats(tmp, head_stats)
            checks[HEAD_STATS_FILE] = file_sha256(tmp / HEAD_STATS_FILE)
        block = {"format": FORMAT, "sources": sources, "sha256": checks}
        (tmp / LAYOUT_FILE).write_text(json.dumps({**layout, CHECKPOINT_KEY: block}, indent=2))
        if times is not None:
            times["checkpoint"] = time.perf_counter() - start
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))

    final = run_dir / TASKS_DIR / own
    atomic_dir(final, fill)
    if metrics is not None:
        atomic_write_json(run_dir / METRICS_FILE, metrics)
    if metrics_csv is not None:
        atomic_write_text(run_dir / METRICS_CSV, metrics_csv)
    if discard is not None:
        shutil.rmtree(discard, ignore_errors=True)
    return final


def save_head_stats(folder: Path, stats: dict[str, torch.Tensor]) -> None:
    """Write head_align's statistics of one task into (the temporary copy of) its task folder."""
    save_file(_contiguous_cpu(stats), str(folder / HEAD_STATS_FILE))


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_head_stats(run_dir: str | Path, task: int) -> dict[str, torch.Tensor] | None:
    """head_align's statistics of ``task`` (None when the task was trained without them), checked against the
    sha256 its layout recorded."""
    folder = task_folder(Path(run_dir) / TASKS_DIR, task)
    path = folder / HEAD_STATS_FILE
    if not path.is_file():
        return None
    _check_recorded_sha256(folder, read_json(folder / LAYOUT_FILE), HEAD_STATS_FILE)
    try:
        return load_file(str(path))
    except (OSError, RuntimeError, SafetensorError) as exc:
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
    return sorted(set(done))


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
    raw = read_yaml_mapping(path)
    if isinstance(raw.get("train"), dict):  # written before train.head existed (issue 21): the paper's head
        raw["train"].setdefault("head", "linear")
    cfg = config_from_dict(raw)
    cfg.run_dir = str(path.parent.absolute())  # where it is now: a run directory can be moved
    return cfg


def _check_recorded_sha256(folder: Path, layout: dict[str, Any], name: str) -> None:
    """UserError when ``folder/name`` differs from the sha256 its layout recorded."""
    expected = layout.get(CHECKPOINT_KEY, {}).get("sha256", {}).get(name)
    if expected is not None and (got := file_sha256(folder / name)) != expected:
        raise UserError(
            f"{folder / name}: sha256 {got[:16]}... does not match {expected[:16]}... recorded in "
            f"{folder / LAYOUT_FILE}; the run directory is damaged (restore the file or retrain from an earlier task)"
        )


def _verified_tensors(folder: Path, layout: dict[str, Any], groups: set[str] | None) -> dict[str, torch.Tensor]:
    """Tensors of ``folder``'s adapters file (only the tensors of ``groups`` when given), checked against the sha256
    its layout recorded."""
    path = folder / ADAPTERS_FILE
    try:
        _check_recorded_sha256(folder, layout, ADAPTERS_FILE)
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if groups is None or _group_of(k) in groups}
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"cannot read the weights of {folder} ({exc}); the run directory is damaged") from exc


def assemble_task_state(run_dir: Path, folder: Path, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every non-W0 tensor of the model saved in ``folder``: its own file plus the frozen factors it points to."""
    sources = layout.get(CHECKPOINT_KEY, {}).get("sources", {})
    by_folder: dict[str, set[str]] = {}
    for key, name in sources.items():
        if name != folder.name:
            by_folder.setdefault(name, set()).add(key)
    state = _verified_tensors(folder, layout, None)
    for name, groups in sorted(by_folder.items()):
        other = run_dir / TASKS_DIR / name
        if not (other / LAYOUT_FILE).is_file():
            raise UserError(
                f"{folder} needs the tensors of {sorted(groups)} from {other}, which is missing; "
                "the run directory is incomplete (restore that folder)"
            )
        state.update(_verified_tensors(other, read_json(other / LAYOUT_FILE), groups))
    return state


def load_task_model(run_dir: str | Path, task: int, cfg: Config | None = None) -> Any:
    """Rebuild the model exactly as it was after ``task`` (weights, layout, trainable flags)."""
    from sdlora_dist.model import RidgeHead, SDLoRAViT, build_backbone

    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    folder = task_folder(run_dir / TASKS_DIR, task)
    layout = read_json(folder / LAYOUT_FILE)
    model_cfg = cfg.model.model_copy(update={"weights": "random"})  # W0 comes from BACKBONE_FILE below
    model = SDLoRAViT(build_backbone(model_cfg), cfg.adapter, method=cfg.train.method)
    model.restore_layout(layout)
    try:
        backbone = load_file(str(run_dir / BACKBONE_FILE))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"cannot read {run_dir / BACKBONE_FILE} ({exc}); the run directory is damaged") from exc
    model.load_weights({**backbone, **assemble_task_state(run_dir, folder, layout)})
    if cfg.train.head == "ridge":  # the analytic head evaluated after this task (ridge_head.py solves it)
        stats = load_head_stats(run_dir, task)
        if stats is None or "ridge_weight" not in stats:
            raise UserError(
                f"task {task} of {run_dir} has no ridge head ({HEAD_STATS_FILE}); the run directory "
                "is damaged or was trained with train.head=linear"
            )
        model.inference_head = RidgeHead(stats["ridge_projection"], stats["ridge_weight"])
    return model


def load_progress(run_dir: str | Path, task: int) -> RunProgress:
    """The run's progress up to ``task`` (the accuracy log and every task's record, as metrics.json holds them).

    Each folder holds its own record (``{"record", "correct", "totals"}``); walking back to task 0 assembles it.
    Records are checked as they are read (UserError naming the progress file).
    """
    tasks_dir = Path(run_dir) / TASKS_DIR
    paths = [task_folder(tasks_dir, t) / PROGRESS_FILE for t in range(task + 1)]
    own = [read_json(path) for path in paths]
    correct = [list(d["correct"]) for d in own]
    totals = list(own[-1]["totals"]) if own else []
    records = [TaskRecord.from_dict(d["record"], path) for path, d in zip(paths, own, strict=True)]
    progress = RunProgress(AccuracyLog(correct=correct, totals=totals), records)
    if own and all("confusion" in d for d in own):  # per-class counts: runs written before them have none
        progress.class_correct = [list(d["class_correct"]) for d in own]
        progress.class_totals, progress.confusion = list(own[-1]["class_totals"]), own[-1]["confusion"]
    return progress


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


def load_run(run_dir: str | Path, task: int | None = None) -> RunState:
    """The model after ``task`` (default: the newest completed task), with what export and evaluation need."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass --run RUN_DIR of a 'sdlora train' run")
    cfg = load_run_config(run_dir)
    done = completed_tasks(run_dir)
    if not done:
        raise UserError(f"run {run_dir} has no completed task yet; train at least one task before exporting")
    if task is not None and task not in done:
        raise UserError(
            f"--task {task} is not a completed task of {run_dir}: its completed tasks are {done[0]}..{done[-1]} "
            f"(omit --task for the newest, {done[-1]})"
        )
    info = read_json(run_dir / RUN_FILE)
    model = load_task_model(run_dir, done[-1] if task is None else task, cfg)
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
