"""Wall time per task of the digits recipe, split into train/eval/consolidate/checkpoint, for 1 and 2 ranks.

    python bench/bench_digits_tasks.py [--out bench/results/digits_tasks.json]

Runs the real CLI (``sdlora data prepare`` once, then ``sdlora train -b digits`` with 1 and with 2 ranks, one
after the other on the same machine) and reads each run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/digits_tasks.json")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "sdlora_dist.cli.main"]
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        run([*cli, "data", "prepare", "--benchmark", "digits", "--out", str(shards)])
        for ranks in (1, 2):
            run_dir = Path(tmp) / f"run{ranks}"
            wall = run([*cli, "train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir),
                        "--gpus-per-node", str(ranks)])  # fmt: skip
            metrics = json.loads((run_dir / "metrics.json").read_text())
            per_task = [{k: round(v, 2) for k, v in t["time_s"].items()} for t in metrics["tasks"]]
            results["runs"][f"{ranks}_rank"] = {
                "wall_s": round(wall, 1),
                "per_task_s": per_task,
                "sum_s": {k: round(sum(t[k] for t in per_task), 2) for k in per_task[0]},
                "acc": metrics["accuracy"]["acc"],
                "aaa": metrics["accuracy"]["aaa"],
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
