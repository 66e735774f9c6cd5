"""Seconds of the release gate on digits (issue 19, "Must measure"): ``run_gate`` (what ``sdlora gate`` runs) on two
exported models of one run, both evaluated by onnxruntime on the digits test shards; writes the table and timing.

    python bench/bench_gate.py --new NEW.onnx --baseline OLD.onnx --data shards/digits

``sdlora demo`` ends with the same gate (its JSON line reports ``seconds.gate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from sdlora_dist.export.gate import run_gate


def main() -> None:
    """Time the gate, print its table, write the JSON (command, seconds, images, verdict, table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--json", default="bench/results/gate_digits.json")
    args = parser.parse_args()
    start = time.perf_counter()
    gate = run_gate(args.new, args.baseline, args.data)
    seconds = time.perf_counter() - start
    images = sum(gate.models[k]["evaluation"]["total"] for k in ("baseline", "new"))
    out = {"machine": f"2-core CPU dev machine ({platform.processor() or platform.machine()}), shared",
           "load_average": os.getloadavg(), "command": f"sdlora gate {args.new} --baseline {args.baseline} "
           f"--data {args.data}", "gate_s": round(seconds, 2), "images_evaluated": images, "passed": gate.passed,
           "old_classes": gate.old_classes, "table": gate.table(), "tasks": gate.tasks}  # fmt: skip
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(gate.table())
    print(f"gate: {seconds:.2f} s for {images} test images (both models); wrote {args.json}")


if __name__ == "__main__":
    main()
