"""Collect what ``bench/gpu_check.sh`` produced into one ``bench/results/gpu_check.json`` and print the headlines.

    python bench/gpu_summary.py --steps STEPS_FILE --setup-s 0 --out bench/results/gpu_check.json

Reads the pytest JUnit file and the benchmark JSONs in the same folder; a missing file is reported as missing (its
step failed), never filled in. Exit code 1 when a step failed or a GPU test failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PEAK = "cuda_step_peak_bytes_median"  # bench_adapters.py: the step's CUDA peak above what was allocated before


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def pytest_counts(junit: Path) -> dict[str, Any] | None:
    """tests / failures / errors / skipped (with reasons) from a JUnit XML file."""
    if not junit.is_file():
        return None
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [
        {"test": f"{case.get('classname')}.{case.get('name')}", "reason": case.find("skipped").get("message", "")}
        for case in suite.iter("testcase")
        if case.find("skipped") is not None
    ]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "skipped_tests": skipped}  # fmt: skip


def adapter_figures(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """bf16 step time of SD-LoRA (dense) at each T against plain LoRA, and the step's peak memory against T."""
    if data is None:
        return None
    rows = {r["name"]: r for r in data["configs"]}
    lora = rows["lora"]["median_step_s"]
    out: dict[str, Any] = {"lora_step_s": lora, "frozen_step_s": rows.get("frozen", {}).get("median_step_s")}
    for row in rows.values():
        if row["kind"] != "dense":
            continue
        out[f"T={row['past_tasks']}"] = {
            "step_s": row["median_step_s"],
            "speed_vs_lora": lora / row["median_step_s"],  # goal at T=10: >= 0.95
            "step_peak_mib": row["cuda_step_peak_bytes_median"] / 2**20 if PEAK in row else None,
        }
    return out


def main() -> int:
    """Write the summary JSON; 1 when anything failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=Path, required=True)
    parser.add_argument("--setup-s", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = args.out.parent
    steps = {}
    for line in args.steps.read_text().splitlines() if args.steps.is_file() else []:
        name, rc, seconds = line.split()
        steps[name] = {"exit_code": int(rc), "seconds": int(seconds)}
    onnx_cuda = _load(results / "onnx_cuda.json")
    loader = _load(results / "loader_gpu.json")
    summary = {
        "command": "bash bench/gpu_check.sh",
        "environment_setup_s": args.setup_s,
        "steps": steps,
        "gpu_tests": pytest_counts(results / "gpu_tests.xml"),
        "adapters_bf16_vit_b16_batch128": adapter_figures(_load(results / "adapters_cuda_bf16.json")),
        "ort_cuda_latency_ms": {r["batch"]: r["median_ms"] for r in onnx_cuda["results"]} if onnx_cuda else None,
        "loader_images_per_s": {r["workers"]: r["best"] for r in loader["results"]} if loader else None,
        "gpu": (onnx_cuda or loader or {}).get("machine", {}).get("gpu"),
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(summary, indent=1))
    tests = summary["gpu_tests"] or {"failures": 1, "errors": 0}
    failed = any(s["exit_code"] for s in steps.values()) or tests["failures"] or tests["errors"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
