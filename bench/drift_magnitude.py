"""How far does the backbone move per task, and how far do the drift maps move old class means? (issue 21)

    python bench/drift_magnitude.py --run RUN_DIR --shards SHARDS [--task 1] [--out bench/results/drift_magnitude.json]

``RUN_DIR``: a run trained with ``train.head=ridge`` (any ``train.drift``). Passes task ``--task``'s train samples
through the checkpoints of tasks t-1 and t (``drift.collect_features``, one process) and reports the mean relative
change of the features and of their projections, and the mean relative shift of task t-1's stored class means
(in the projected space) under the ``linear`` map and under ``sdc``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdlora_dist import drift
from sdlora_dist import ridge_head as rh
from sdlora_dist.checkpoint import load_head_stats, load_run_config, load_task_model
from sdlora_dist.data import load_manifest
from sdlora_dist.jobs.distributed import DistEnv
from sdlora_dist.preprocess import transform_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--shards", required=True, type=Path)
    parser.add_argument("--task", type=int, default=1)
    parser.add_argument("--out", default="bench/results/drift_magnitude.json")
    args = parser.parse_args()
    cfg, env, manifest, task = load_run_config(args.run), DistEnv(0, 1, 0, 0, torch.device("cpu")), None, args.task
    manifest = load_manifest(args.shards)
    before, after = load_task_model(args.run, task - 1, cfg), load_task_model(args.run, task, cfg)
    spec = transform_spec(after, cfg.data)
    pairs = drift.collect_features(cfg, before, task, env, spec, manifest)
    pairs = drift.collect_features(cfg, after, task, env, spec, manifest, pairs)
    old, new = torch.cat(pairs.old), torch.cat(pairs.new)
    prev = load_head_stats(args.run, task - 1)
    proj = prev["ridge_projection"]
    h_old, h_new = rh.project(old, proj), rh.project(new, proj)
    paired = drift.reduce_paired_sums(pairs, proj.shape[1], env.device, transform=lambda f: rh.project(f, proj))
    means = prev["ridge_sums"] / prev["ridge_count"][:, None]
    linear = drift.fit_linear_map(paired, cfg.train.drift_ridge)
    sigma2 = drift.sdc_sigma2(paired, cfg.train.sdc_bandwidth)
    shifts = drift.sdc_shifts(pairs, means, sigma2, env.device, transform=lambda f: rh.project(f, proj))
    rel = lambda a, b: float(((a - b).norm(dim=1) / b.norm(dim=1)).mean())  # noqa: E731
    out = {
        "run": str(args.run),
        "task": task,
        "samples": len(old),
        "feature_change": rel(new, old),
        "projected_change": rel(h_new, h_old),
        "mean_shift_linear": rel(linear.points(means), means),
        "mean_shift_sdc": rel(means + shifts, means),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
