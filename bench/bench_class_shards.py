"""Class-grouped shards (class order and split at train time): prepare cost and bytes read per task.

    python bench/bench_class_shards.py [--classes 20] [--per-class 40] [--reps 3] [--out FILE.json]

Source: a synthetic ImageNet-R-style tree (``<class>/*.jpg``, 500x375 photo-like JPEGs, seeded 80/20 split).

* Prepare: wall time (1 encoding process, best and median of ``--reps`` runs) and total bytes on disk (shards +
  manifest). (It was first compared with the per-task layout, since removed; those figures stay in BENCHMARKS.md as
  historical.)
* Bytes read per task: one full train epoch (1 rank, ``num_workers=0``) and one evaluation of each task of a
  5-task split with ``data.class_order_seed=1`` (an order the shards were not written in), read through the
  loaders; bytes read = this process's ``rchar`` (``/proc/self/io``) over the loop, against the bytes of the task's
  classes' shards. Goal: 1.0x (a task reads its own classes' shards once and nothing else).
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
    """Repeated prepare runs into ``tmp/class``; best and median seconds, bytes on disk, file counts."""
    runs = []
    out = tmp / "class"
    for _ in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        prepare("imagenet-r", src, out, tasks=10, progress=False, workers=1, subset=True)
        runs.append(time.perf_counter() - start)
    return {"best_s": round(min(runs), 3), "median_s": round(statistics.median(runs), 3), "bytes": disk_bytes(out),
            "shards": len(list(out.rglob("*.tar"))), "manifest_bytes": (out / MANIFEST_NAME).stat().st_size}


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
    ratios = {k: [r[k]["ratio"] for r in per_task] for k in ("train", "eval")}
    result = {
        "benchmark": "class-grouped shards: prepare time and bytes; bytes read per task",
        "source": f"synthetic imagenet-r tree: {args.classes} classes x {args.per_class} JPEGs 500x375, 80/20 split",
        "prepare": prep,
        "bytes_read_per_task": {
            "split": "5 tasks, data.class_order_seed=1, 1 rank, num_workers=0",
            "tasks": per_task,
            "ratio_min_max": {k: [min(v), max(v)] for k, v in ratios.items()},
        },
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    read = result["bytes_read_per_task"]
    print(json.dumps({"prepare": prep, "bytes_read_ratio_min_max": read["ratio_min_max"]}, indent=1))


if __name__ == "__main__":
    main()
