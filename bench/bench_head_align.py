"""Classifier alignment (train.head_align, issue 13) on the digits recipe: accuracy, cost and memory.

    python bench/bench_head_align.py [--seeds 1993 1994 1995] [--backbone FILE] [--out bench/results/head_align.json]

Runs the real CLI (``sdlora train -b digits``, 1 rank, the demo's toy backbone: pre-trained on synthetic glyphs by
``toy_backbone.pretrain_toy_backbone`` unless ``--backbone`` gives one) for every seed with ``head_align=none`` and
``gaussian`` under each covariance mode, one after the other on the same machine, and reads each ``metrics.json``.
Also reports the stored statistics' bytes (on disk and from ``head_align.stats_bytes``) and the same formula for
ViT-B/16 (d = 768) with DomainNet's 345 classes in 5 tasks.
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

MODES = [("none", None), ("gaussian", "full"), ("gaussian", "shared"), ("gaussian", "diag")]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def one_run(
    cli: list[str], shards: Path, backbone: Path, run_dir: Path, seed: int, mode: str, cov: str | None
) -> dict:
    sets = [f"model.weights={backbone}", f"train.seed={seed}", f"train.head_align={mode}"]
    if cov:
        sets.append(f"train.head_align_cov={cov}")
    args = [arg for s in sets for arg in ("--set", s)]
    wall = run([*cli, "train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), *args])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    acc = metrics["accuracy"]
    tasks = metrics["tasks"]
    out = {"wall_s": round(wall, 1), "acc": acc["acc"], "aaa": acc["aaa"], "forgetting": acc["forgetting"],
           "train_s_per_task": statistics.mean(t["time_s"]["train"] for t in tasks)}  # fmt: skip
    if mode != "none":
        for key in ("head_stats", "head_align", "eval_before_align"):
            out[f"{key}_s_per_task"] = statistics.mean(t["time_s"][key] for t in tasks)
        out["top1_before_after"] = [[t["head_align"]["before"]["top1"], t["head_align"]["after"]["top1"]]
                                    for t in tasks]  # fmt: skip
        out["stats_bytes_formula"] = tasks[-1]["head_align"]["stats_bytes"]
        out["stats_bytes_on_disk"] = sum(p.stat().st_size for p in run_dir.glob("tasks/*/head_stats.safetensors"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--backbone", default=None, help="toy backbone safetensors (pre-trained here if absent)")
    parser.add_argument("--out", default="bench/results/head_align.json")
    args = parser.parse_args()
    from sdlora_dist.head_align import stats_bytes

    cli = [sys.executable, "-m", "sdlora_dist.cli.main"]
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        run([*cli, "data", "prepare", "--benchmark", "digits", "--out", str(shards)])
        backbone = Path(args.backbone) if args.backbone else Path(tmp) / "backbone.safetensors"
        if not backbone.is_file():
            from sdlora_dist.jobs.frontdoor import resolve_config
            from sdlora_dist.toy_backbone import pretrain_toy_backbone

            pretrain_toy_backbone(resolve_config("digits", None, [], str(shards), None).model, backbone)
        for seed in args.seeds:
            for mode, cov in MODES:
                name = mode if cov is None else f"{mode}-{cov}"
                run_dir = Path(tmp) / f"{name}-{seed}"
                results["runs"].setdefault(name, {})[str(seed)] = one_run(cli, shards, backbone, run_dir, seed, mode,
                                                                          cov)  # fmt: skip
                print(name, seed, json.dumps(results["runs"][name][str(seed)]), flush=True)
    results["mean"] = {
        name: {k: statistics.mean(r[k] for r in runs.values()) for k in ("acc", "aaa", "forgetting")}
        for name, runs in results["runs"].items()
    }
    results["vit_b_345_classes_5_tasks_bytes"] = {
        cov: stats_bytes(cov, 345, 768, 5) for cov in ("full", "shared", "diag")
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["mean"], indent=2))


if __name__ == "__main__":
    main()
