"""Digits accuracy on class-grouped shards: the default class order and other seeds.

    python bench/bench_class_order_accuracy.py [--out bench/results/class_order_accuracy.json]

The digits recipe (5 tasks of 2 classes, 5 epochs, 1 rank) on the demo's tiny ViT pre-trained on synthetic glyphs
(``toy_backbone``, as ``sdlora demo`` does), so the numbers mean something. Runs: the default class order, then
``data.class_order_seed`` 1 and 2, and ``sdlora report`` over the three. (The per-task shard layout this was first
compared with is gone; its figures stay in BENCHMARKS.md as historical.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from sdlora_dist.data import prepare
from sdlora_dist.jobs.frontdoor import resolve_config
from sdlora_dist.report_runs import write_aggregate_report
from sdlora_dist.toy_backbone import pretrain_toy_backbone


def train(shards: Path, run_dir: Path, backbone: Path, sets: list[str]) -> dict:
    """One digits-recipe run; its summary metrics and the recorded split."""
    argv = [sys.executable, "-m", "sdlora_dist.cli.main", "train", "-b", "digits", "--data", str(shards), "--run-dir",
            str(run_dir), *(a for s in [f"model.weights={backbone}", *sets] for a in ("--set", s))]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode:  # one process per run: a rank's environment (RANK, ports) must not leak into the next
        raise RuntimeError(f"training {run_dir} failed: {done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    split = json.loads((run_dir / "run.json").read_text())["task_split"]
    return {"acc": round(metrics["acc"], 2), "aaa": round(metrics["aaa"], 2),
            "forgetting": round(metrics["forgetting"], 2), "class_order": split["class_order"],
            "class_order_from": split["class_order_from"]}  # fmt: skip


def main() -> None:
    """Prepare the shards, pre-train the glyph ViT once, train the runs, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/class_order_accuracy.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare("digits", None, tmp / "class", progress=False, workers=1)
        backbone = tmp / "backbone.safetensors"
        pretrain_toy_backbone(resolve_config("digits", None, [], str(tmp / "class"), None).model, backbone)
        runs = {
            "class-grouped, default order": train(tmp / "class", tmp / "runs" / "seed-default", backbone, []),
        }
        for seed in (1, 2):
            runs[f"class-grouped, class_order_seed {seed}"] = train(
                tmp / "class", tmp / "runs" / f"seed-{seed}", backbone, [f"data.class_order_seed={seed}"]
            )
        _, table = write_aggregate_report([str(tmp / "runs" / "seed-*")], tmp / "report")
        aggregate = json.loads((tmp / "report" / "aggregate.json").read_text())["summary"]
    result = {
        "benchmark": "digits recipe accuracy on class-grouped shards: default order and other seeds",
        "runs": runs,
        "three_orders_on_class_grouped_shards": aggregate,
        "report_table": table,
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(runs, indent=1))
    print(table)


if __name__ == "__main__":
    main()
