"""Seconds for ``sdlora export OUT --run R --task K`` against the task count T (issue 19, "Must measure").

A run directory of T tasks is written through the real checkpoint code (consolidate, open the next task, random
values in the trainable tensors: no training, the export cost does not depend on the values), then task K = T // 2
(a rollback to a model from the middle of the run) is exported with ``export_run`` exactly as the CLI does:
rebuilding the model from the per-task checkpoints, merging, tracing with the dynamo exporter, verifying with
onnxruntime on random inputs (no shards at hand: ``--verify-images`` has nothing to read), writing atomically. The
seconds are split into the rebuild (``load_run``) and the whole command.

    python bench/bench_export_task.py                          # tiny and ViT-B/16 shapes (32 px), T = 10 and 50
    python bench/bench_export_task.py --models tiny --tasks 10
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sdlora_dist import checkpoint as ckpt  # import sdlora_dist before timm: torchvision compat
from sdlora_dist.config import load_config
from sdlora_dist.export.from_run import export_run
from sdlora_dist.model import build_model

MODELS = {  # timm name and kwargs: width, depth and head as the real models, images 32 px (as bench_checkpoint.py)
    "tiny": ("vit_tiny_patch16_224", "{img_size: 32, patch_size: 16}"),
    "vit_b16": ("vit_base_patch16_224", "{img_size: 32, patch_size: 16}"),
}


def write_run(run_dir: Path, model_key: str, tasks: int, classes: int) -> None:
    """A run directory of ``tasks`` tasks of ``classes`` classes each."""
    name, kwargs = MODELS[model_key]
    cfg = load_config(overrides=[f"model.name={name}", "model.weights=random", f"model.kwargs={kwargs}",
                                 f"run_dir={run_dir}"])  # fmt: skip
    model = build_model(cfg)
    names = [f"class_{i}" for i in range(tasks * classes)]
    ckpt.write_run_header(run_dir, cfg, model, {"benchmark": "bench", "class_names": names})
    gen = torch.Generator().manual_seed(0)
    for t in range(tasks):
        if t:
            model.consolidate()
        model.add_task(classes)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ckpt.save_task_checkpoint(run_dir, t, model, {"task": t})


def measure(model_key: str, tasks: int, classes: int, work: Path) -> dict[str, Any]:
    """Seconds to rebuild and to export task T // 2 of a T-task run."""
    run_dir = work / f"{model_key}_{tasks}"
    start = time.perf_counter()
    write_run(run_dir, model_key, tasks, classes)
    setup = time.perf_counter() - start
    task = tasks // 2
    start = time.perf_counter()
    ckpt.load_run(run_dir, task)
    rebuild = time.perf_counter() - start
    start = time.perf_counter()
    report = export_run(work / f"{model_key}_{tasks}.onnx", run_dir=run_dir, task=task, verify_images=0)
    seconds = time.perf_counter() - start
    row = {"model": model_key, "tasks": tasks, "task_exported": task, "classes": (task + 1) * classes,
           "rebuild_s": round(rebuild, 2), "export_task_s": round(seconds, 2), "setup_run_s": round(setup, 1),
           "file_mib": round(report.file_bytes / 2**20, 1), "max_abs_diff": report.checks[0].max_abs_diff}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    """Measure every (model, T) pair and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--out", default="bench/results/export_task.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    result = {"machine": f"2-core CPU dev machine ({platform.processor() or platform.machine()}), shared",
              "torch": torch.__version__, "rows": rows}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for model_key in args.models:
            for tasks in args.tasks:
                rows.append(measure(model_key, tasks, args.classes, Path(tmp)))
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # each row lands as soon as measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
