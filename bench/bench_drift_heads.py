"""Drift compensation and the ridge head (issue 21): none, gaussian, gaussian + drift, ridge, ridge + drift.

    python bench/bench_drift_heads.py --backbone FILE --digits SHARDS --animals SHARDS --omniglot SHARDS \\
        [--seeds 1993 1994 1995] [--epochs 3] [--drift linear] [--out bench/results/drift_heads.json]

``--digits``: ``sdlora data prepare --benchmark digits``; ``--animals``: the Animal-MNIST silhouettes
(``bench/prepare_animal_shapes.py`` then ``sdlora data prepare --benchmark imagefolder --tasks 5``);
``--omniglot``: 100 Omniglot characters (``bench/prepare_omniglot.py`` then ``... --tasks 10``). ``--backbone``:
the demo's glyph-pretrained toy ViT (``toy_backbone.pretrain_toy_backbone``). Every run is the real CLI on 1 rank
with the digits recipe's model and optimiser (digits and animals in 5 tasks of 2 classes, Omniglot in 10 of 10);
seed s sets ``train.seed`` and ``data.class_order_seed``. The seeds of each setting are aggregated by ``sdlora
report`` (mean +- std of Acc, AAA, forgetting); this script adds task 0's accuracy at the end and the seconds per
task of each added pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "sdlora_dist.cli.main"]
RECIPE = [
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 192, depth: 2, num_heads: 3, global_pool: avg}",
    "adapter.rank=8", "adapter.init_magnitude=0.8", "data.batch_size=32", "data.eval_batch_size=128",
    "data.num_workers=0", "data.normalize=half", "data.train_crop_scale=[0.6, 1.0]", "data.hflip=0.0",
    "data.eval_crop_pct=1.0", "train.lr=0.02", "train.checkpoint_every=0", "train.timeout_s=300",
]  # fmt: skip
PASSES = ("drift_before", "features_after", "head_stats", "eval_before_align", "head_align", "ridge_stats",
          "ridge_solve")  # fmt: skip


def modes(drift: str) -> dict[str, list[str]]:
    """Setting name -> its ``--set`` values."""
    return {
        "none": ["train.head=linear"],
        "gaussian": ["train.head=linear", "train.head_align=gaussian"],
        f"gaussian+{drift}": ["train.head=linear", "train.head_align=gaussian", f"train.drift={drift}"],
        "ridge": ["train.head=ridge"],
        f"ridge+{drift}": ["train.head=ridge", f"train.drift={drift}"],
    }


def run(cmd: list[str]) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def train(shards: Path, benchmark: str, run_dir: Path, seed: int, backbone: Path, epochs: int, extra: list[str]
          ) -> dict:  # fmt: skip
    sets = [*RECIPE, f"model.weights={backbone}", f"train.seed={seed}", f"data.class_order_seed={seed}",
            f"train.epochs={epochs}", *extra]  # fmt: skip
    start = time.perf_counter()
    run([*CLI, "train", "-b", benchmark, "--data", str(shards), "--run-dir", str(run_dir),
         *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tasks = metrics["tasks"]
    times = {p: statistics.mean(t["time_s"].get(p, 0.0) for t in tasks) for p in PASSES}
    return {"wall_s": round(wall, 1), "task0_final": metrics["accuracy"]["matrix"][-1][0],
            "train_s_per_task": statistics.mean(t["time_s"]["train"] for t in tasks),
            "pass_s_per_task": {k: round(v, 3) for k, v in times.items() if v}}  # fmt: skip


def aggregate(run_dirs: list[Path], out: Path, per_run: list[dict]) -> dict:
    """``sdlora report`` over the seeds, plus task 0's final accuracy and the pass timings (mean +- std)."""
    run([*CLI, "report", *map(str, run_dirs), "--out", str(out)])
    numbers = json.loads((out / "aggregate.json").read_text())
    task0 = [r["task0_final"] for r in per_run]
    summary = {k: v for k, v in numbers["summary"].items()}
    summary["task0_final"] = {"mean": statistics.mean(task0), "std": statistics.stdev(task0) if len(task0) > 1 else 0}
    passes = sorted({p for r in per_run for p in r["pass_s_per_task"]})
    return {
        "summary": summary,
        "per_run": [{**a, "task0_final": r["task0_final"]} for a, r in zip(numbers["per_run"], per_run, strict=True)],
        "train_s_per_task": statistics.mean(r["train_s_per_task"] for r in per_run),
        "pass_s_per_task": {p: statistics.mean(r["pass_s_per_task"].get(p, 0.0) for r in per_run) for p in passes},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--digits", type=Path, help="digits shards")
    parser.add_argument("--animals", type=Path, help="Animal-MNIST imagefolder shards")
    parser.add_argument("--omniglot", type=Path, help="Omniglot imagefolder shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--drift", default="linear", choices=["linear", "sdc"])
    parser.add_argument("--only", nargs="*", default=None, help="settings to run (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="more --set values for every run (e.g. train.lr=0.1)")
    parser.add_argument("--tag", default="", help="suffix of the data set's name in the JSON (e.g. -lr0.1)")
    parser.add_argument("--out", default="bench/results/drift_heads.json")
    args = parser.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    results.setdefault("runs", {})
    sources = (("digits", args.digits, "digits"), ("animals", args.animals, "generic"),
               ("omniglot", args.omniglot, "generic"))  # fmt: skip
    data = [(name + args.tag, path, bench) for name, path, bench in sources if path]
    with tempfile.TemporaryDirectory() as tmp:
        for name, shards, benchmark in data:
            for setting, extra in modes(args.drift).items():
                if args.only and setting not in args.only:
                    continue
                dirs = [Path(tmp) / f"{name}-{setting}-{seed}" for seed in args.seeds]
                extra = [*args.extra, *extra]
                per_run = [train(shards, benchmark, d, seed, args.backbone, args.epochs, extra)
                           for d, seed in zip(dirs, args.seeds, strict=True)]  # fmt: skip
                entry = aggregate(dirs, Path(tmp) / f"report-{name}-{setting}", per_run)
                entry |= {
                    "seeds": args.seeds,
                    "epochs": args.epochs,
                    "sets": extra,
                    "wall_s_per_run": [r["wall_s"] for r in per_run],
                }
                results["runs"].setdefault(name, {})[setting] = entry
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(results, indent=2))
                s = entry["summary"]
                print(f"{name:8s} {setting:18s} Acc {s['acc']['mean']:.2f}+-{s['acc']['std']:.2f} "
                      f"AAA {s['aaa']['mean']:.2f} F {s['forgetting']['mean']:.2f} "
                      f"t0 {s['task0_final']['mean']:.2f}+-{s['task0_final']['std']:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
