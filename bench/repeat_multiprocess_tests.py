"""Run every multi-process test N times in a row and count failures (flakiness, not speed).

    python bench/repeat_multiprocess_tests.py [--reps 20] [-k EXPR] [--files tests/test_launch.py ...]
                                              [--out bench/results/repeat_multiprocess_tests.json]

The tests are the ``slow``-marked tests of the files that start real processes (2 gloo ranks through torchrun or
the DeepSpeed runner). Each test runs ``--reps`` times in a row, each time in a fresh ``pytest`` process, so one
run's leftovers cannot hide or cause another's failure. The JSON is rewritten after every run: an interrupted
session keeps what it measured. A failure keeps the last lines of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [
    "tests/test_launch.py",
    "tests/test_distributed.py",
    "tests/test_faults.py",
    "tests/test_data_distributed.py",
    "tests/test_train.py",
]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}


def collect(files: list[str], keyword: str | None) -> list[str]:
    """Node ids of the slow tests in ``files`` (optionally filtered by ``-k``)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider", *files]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def run_once(node_id: str, timeout: int) -> dict:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node_id]
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
        passed, tail = res.returncode == 0, (res.stdout + res.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        passed, tail = False, f"timed out after {timeout} s"
    return {"passed": passed, "seconds": round(time.monotonic() - start, 1), "tail": "" if passed else tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to pick tests")
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/repeat_multiprocess_tests.json")
    args = parser.parse_args()
    tests = collect(args.files, args.keyword)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "reps_requested": args.reps,
        "tests": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for node_id in tests:
        runs = []
        for _ in range(args.reps):
            runs.append(run_once(node_id, args.timeout))
            report["tests"][node_id] = {
                "runs": len(runs),
                "failed": sum(not r["passed"] for r in runs),
                "median_s": sorted(r["seconds"] for r in runs)[len(runs) // 2],
                "failures": [r["tail"] for r in runs if not r["passed"]],
            }
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        summary = report["tests"][node_id]
        print(f"{node_id}: {summary['failed']}/{summary['runs']} failed, median {summary['median_s']} s", flush=True)


if __name__ == "__main__":
    main()
