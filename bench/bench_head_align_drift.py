"""How much could a feature-drift correction buy train.head_align? An upper bound on digits (issue 13).

    python bench/bench_head_align_drift.py --backbone FILE [--seeds 1993 1994 1995] [--out ...head_align_drift.json]

For each seed and covariance mode, trains the digits recipe with ``head_align=gaussian`` (1 rank), then takes the
final model and re-aligns its head twice from the same starting head, with the same seed:

* ``stale``: the stored statistics (old classes' features from the model *at their time*: what the recipe uses);
* ``oracle``: every class's statistics recomputed under the final model. This needs old tasks' images, which a
  rehearsal-free method may not keep: it is the best any drift correction (e.g. SDC) could reach.

Also reports the relative drift of each old task's class means, ``||mu_stored - mu_final|| / ||mu_final||``.
If ``oracle`` does not beat ``stale``, a drift correction cannot help on this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def train(shards: Path, backbone: Path, run_dir: Path, seed: int, cov: str) -> None:
    sets = [
        f"model.weights={backbone}",
        f"train.seed={seed}",
        "train.head_align=gaussian",
        f"train.head_align_cov={cov}",
    ]
    cmd = [sys.executable, "-m", "sdlora_dist.cli.main", "train", "-b", "digits", "--data", str(shards),
           "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])


def compare(run_dir: Path) -> dict:
    from sdlora_dist import head_align as ha
    from sdlora_dist.checkpoint import completed_tasks, load_run_config, load_task_model
    from sdlora_dist.jobs.distributed import DistEnv
    from sdlora_dist.recipe import evaluate, transform_spec

    cfg = load_run_config(run_dir)
    t, cov = cfg.train, cfg.train.head_align_cov
    last = completed_tasks(run_dir)[-1]
    model = load_task_model(run_dir, last, cfg)
    env, spec = DistEnv(0, 1, 0, 0, torch.device("cpu")), transform_spec(model, cfg.data)
    stale_tasks = ha.load_previous_stats(run_dir, last + 1, cov)
    fresh_tasks = [ha.finalize(ha.collect_task_sums(cfg, model, j, env, spec), cov) for j in range(last + 1)]
    drift = [float(((s["mean"] - f["mean"]).norm(dim=1) / f["mean"].norm(dim=1)).mean())
             for s, f in zip(stale_tasks, fresh_tasks, strict=True)]  # fmt: skip
    start = [p.detach().clone() for p in model.head.full()]
    out = {"relative_mean_drift_per_task": drift}
    for name, per_task in (("stale", stale_tasks), ("oracle", fresh_tasks)):
        weight, bias = ha.align_head(*start, ha.merge_tasks(per_task, cov), epochs=t.head_align_epochs,
                                     per_class=t.head_align_samples, lr=t.head_align_lr,
                                     batch_size=t.head_align_batch_size,
                                     generator=torch.Generator().manual_seed(t.seed * 1000 + last))  # fmt: skip
        ha.set_head(model, weight, bias)
        correct, totals = evaluate(cfg, model, last, env, spec)
        out[name] = 100.0 * sum(correct) / sum(totals)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", required=True, help="the demo's toy backbone (bench_head_align.py makes one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--covs", nargs="+", default=["shared", "full"])
    parser.add_argument("--out", default="bench/results/head_align_drift.json")
    args = parser.parse_args()
    from sdlora_dist.data import prepare

    results: dict = {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        prepare("digits", None, shards, progress=False)
        for cov in args.covs:
            for seed in args.seeds:
                run_dir = Path(tmp) / f"{cov}-{seed}"
                train(shards, Path(args.backbone), run_dir, seed, cov)
                results["runs"].setdefault(cov, {})[str(seed)] = compare(run_dir)
                print(cov, seed, json.dumps(results["runs"][cov][str(seed)]), flush=True)
    results["mean"] = {cov: {k: statistics.mean(r[k] for r in runs.values()) for k in ("stale", "oracle")}
                       for cov, runs in results["runs"].items()}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["mean"], indent=2))


if __name__ == "__main__":
    main()
