"""What train.deterministic and train.grad_accum cost: train seconds per setting on the digits recipe (tiny ViT).

    python bench/bench_train_basics.py --data SHARDS [--tasks 2] [--repeats 2] [--out bench/results/train_basics.json]

Each setting trains the same seeded run through ``sdlora train`` (one rank); the figure is the sum of the
``time_s.train`` phases in metrics.json (the optimizer loop only), median over ``--repeats``. Settings run
interleaved so machine noise hits all alike. Also records whether the final adapters equal the baseline's bit for bit.
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
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["model.name=vit_tiny_patch16_224", "model.weights=random", "adapter.rank=4", "data.batch_size=16",
        "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "data.num_workers=0",
        "train.epochs=1"]  # fmt: skip
SETTINGS = {"baseline": [], "deterministic": ["train.deterministic=true"], "grad_accum_2": ["train.grad_accum=2"],
            "grad_accum_4": ["train.grad_accum=4"]}  # fmt: skip


def train(data: str, run_dir: Path, tasks: int, extra: list[str]) -> float:
    """Train and return the seconds of the optimizer loops."""
    sets = [a for s in [*TINY, f"train.tasks={tasks}", *extra] for a in ("--set", s)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "sdlora_dist.cli.main", "-q", "train", "-b", "digits", "--data", data, "--run-dir",
           str(run_dir), *sets]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)
    tasks_done = json.loads((run_dir / "metrics.json").read_text())["tasks"]
    return sum(t["time_s"]["train"] for t in tasks_done)


def main() -> None:
    """Run the benchmark and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/train_basics.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_basics_"))
    seconds: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for rep in range(args.repeats):
        for name, extra in SETTINGS.items():
            seconds[name].append(train(args.data, tmp / f"{name}-{rep}", args.tasks, extra))
    last = f"tasks/task_{args.tasks - 1:02d}/adapters.safetensors"
    base = load_file(tmp / "baseline-0" / last)
    rows = {}
    base_s = statistics.median(seconds["baseline"])
    for name in SETTINGS:
        other = load_file(tmp / f"{name}-0" / last)
        rows[name] = {"train_s_median": round(statistics.median(seconds[name]), 2), "train_s": seconds[name],
                      "vs_baseline": round(statistics.median(seconds[name]) / base_s, 3),
                      "adapters_bitwise_equal_baseline": all(torch.equal(base[k], other[k]) for k in base),
                      "adapters_max_abs_diff": max(float((base[k] - other[k]).abs().max()) for k in base)}  # fmt: skip
        print(name, json.dumps(rows[name]))
    result = {"benchmark": "train.deterministic / train.grad_accum cost, digits, tiny ViT, 1 rank CPU",
              "tasks": args.tasks, "repeats": args.repeats, "settings": SETTINGS, "results": rows,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__}}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
