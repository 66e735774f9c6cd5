"""Class-grouped shards (class order and split at train time) against the per-task layout of earlier versions.

    python bench/bench_class_shards.py [--classes 20] [--per-class 40] [--reps 3] [--out FILE.json]

Source: a synthetic ImageNet-R-style tree (``<class>/*.jpg``, 500x375 photo-like JPEGs, seeded 80/20 split).

* Prepare: wall time (1 encoding process, best and median of ``--reps`` alternating runs) and total bytes on disk
  (shards + manifest) of ``prepare(layout="class")`` against ``prepare(layout="task")``. Goal: equal within 10 %.
* Bytes read per task: one full train epoch (1 rank, ``num_workers=0``) and one evaluation of each task of a
  5-task split with ``data.class_order_seed=1`` (an order the shards were not written in), read through the
  loaders; bytes read = this process's ``rchar`` (``/proc/self/io``) over the loop, against the bytes of the task's
  classes' shards. Goal: 1.0x (a task reads its own classes' shards once and nothing else). The same loop over the
  per-task layout (its own 10-task split) gives the reader's own overhead for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from sdlora_dist.config import DataConfig
from sdlora_dist.data import TransformSpec, load_manifest, make_eval_loader, make_train_loader, prepare
from sdlora_dist.data.classes import resolve_split, task_view
from sdlora_dist.data.manifest import MANIFEST_NAME

SPEC = TransformSpec(img_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)


def make_source(root: Path, classes: int, per_class: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``root/n<class>/img_*.jpg``: photo-like JPEGs (q90), ``per_class`` per class."""
    rng = np.random.RandomState(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(classes):
        for i in range(per_class):
            base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) for _ in range(3)], -1)
            base += np.cos(yy / rng.uniform(20, 80))[..., None]
            pixels = np.clip(127 + 50 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            path = root / f"n{c:08d}" / f"img_{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
    return root


def rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def disk_bytes(folder: Path) -> int:
    """Shards plus manifest."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def time_prepare(src: Path, tmp: Path, reps: int) -> dict:
    """Alternating prepare runs of both layouts; best and median seconds, bytes on disk, file counts."""
    seconds: dict[str, list[float]] = {"task": [], "class": []}
    for _ in range(reps):
        for layout in ("task", "class"):
            out = tmp / layout
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            prepare("imagenet-r", src, out, tasks=10, progress=False, workers=1, subset=True, layout=layout)
            seconds[layout].append(time.perf_counter() - start)
    rows = {}
    for layout, runs in seconds.items():
        out = tmp / layout
        rows[layout] = {"best_s": round(min(runs), 3), "median_s": round(statistics.median(runs), 3),
                        "bytes": disk_bytes(out), "shards": len(list(out.rglob("*.tar"))),
                        "manifest_bytes": (out / MANIFEST_NAME).stat().st_size}  # fmt: skip
    rows["ratio_class_over_task"] = {
        "best_s": round(rows["class"]["best_s"] / rows["task"]["best_s"], 3),
        "median_s": round(rows["class"]["median_s"] / rows["task"]["median_s"], 3),
        "bytes": round(rows["class"]["bytes"] / rows["task"]["bytes"], 4),
    }
    return rows


def bytes_per_task(shards: Path, tasks: int, seed: int | None) -> list[dict]:
    """Per task of a train-time split: bytes read by one train epoch and one evaluation against its shards' bytes."""
    manifest = load_manifest(shards)
    split = resolve_split(manifest, SimpleNamespace(class_order_seed=seed, class_order=None, tasks=tasks,
                                                    classes_per_task=None))  # fmt: skip
    view = task_view(manifest, split)
    data = DataConfig(shards=str(shards), batch_size=16, num_workers=0)
    rows = []
    for t in range(view.num_tasks()):
        row = {"task": t, "classes": split.task_classes(t)}
        for name, loader, shard_split in (
            ("train", make_train_loader(data, t, spec=SPEC, epoch=0, seed=0, manifest=view), "train"),
            ("eval", make_eval_loader(shards, [t], spec=SPEC, batch_size=64, manifest=view), "test"),
        ):
            expected = sum(s.bytes for s in view.task_shards(shard_split, t))
            before = rchar()
            samples = sum(int(y.shape[0]) for _, y in loader)
            read = rchar() - before
            row[name] = {"samples": samples, "bytes_read": read, "task_shard_bytes": expected,
                         "ratio": round(read / expected, 4)}  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    """Run both measurements and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/class_shards.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "src", args.classes, args.per_class)
        prep = time_prepare(src, Path(tmp), args.reps)
        per_task = bytes_per_task(Path(tmp) / "class", tasks=5, seed=1)
        old = bytes_per_task(Path(tmp) / "task", tasks=10, seed=None)  # the same reader on per-task shards
    ratios = {k: [r[k]["ratio"] for r in per_task] for k in ("train", "eval")}
    old_ratios = {k: [r[k]["ratio"] for r in old] for k in ("train", "eval")}
    result = {
        "benchmark": "class-grouped shards vs per-task shards: prepare time and bytes; bytes read per task",
        "source": f"synthetic imagenet-r tree: {args.classes} classes x {args.per_class} JPEGs 500x375, 80/20 split",
        "prepare": prep,
        "bytes_read_per_task": {
            "split": "5 tasks, data.class_order_seed=1, 1 rank, num_workers=0",
            "tasks": per_task,
            "ratio_min_max": {k: [min(v), max(v)] for k, v in ratios.items()},
            "per_task_layout_ratio_min_max": {k: [min(v), max(v)] for k, v in old_ratios.items()},
            "per_task_layout_tasks": old,
        },
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    read = result["bytes_read_per_task"]
    print(json.dumps({"prepare": prep, "bytes_read_ratio_min_max": read["ratio_min_max"],
                      "per_task_layout": read["per_task_layout_ratio_min_max"]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
