"""The release gate on digits (issue 19, "Must measure"): ``sdlora demo`` end to end (its last step gates the 5-task
model against the 4-task one), then the gate alone timed again on the demo's two files.

    python bench/bench_gate.py                     # full demo recipe, 2 ranks
    python bench/bench_gate.py --out /tmp/demo     # reuses the demo's backbone file there when present
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from sdlora_dist.demo import run_demo
from sdlora_dist.export.gate import run_gate


def main() -> None:
    """Run the demo, time the gate once more on its files, write the JSON (table, verdict, seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_bench")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", default="bench/results/gate_digits.json")
    args = parser.parse_args()
    result = run_demo(args.out, ranks=args.ranks)
    start = time.perf_counter()
    gate = run_gate(result.onnx, Path(args.out) / "model_task3.onnx", result.shards)
    seconds = time.perf_counter() - start
    images = sum(gate.models[k]["evaluation"]["total"] for k in ("baseline", "new"))
    out = {"machine": f"2-core CPU dev machine ({platform.processor() or platform.machine()}), shared",
           "command": f"sdlora gate {result.onnx} --baseline {Path(args.out) / 'model_task3.onnx'} "
                      f"--data {result.shards}",
           "gate_s": round(seconds, 2), "images_evaluated": images, "demo_gate_s": round(result.times["gate"], 2),
           "demo_times_s": {k: round(v, 1) for k, v in result.times.items()}, "passed": gate.passed,
           "table": gate.table(), "old_classes": gate.old_classes, "tasks": gate.tasks}  # fmt: skip
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(gate.table())
    print(f"gate alone: {seconds:.2f} s for {images} test images (both models); wrote {args.json}")


if __name__ == "__main__":
    main()
