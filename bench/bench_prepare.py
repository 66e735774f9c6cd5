"""Prepare throughput: source images written to shards per second (read, downscale, encode, tar, sha256).

    python bench/bench_prepare.py [--root DIR] [--images 400] [--out bench/results/bench_prepare.json]

Without ``--root`` it uses the synthetic source of ``bench_loader.py`` (500x375 JPEGs -> resized to 256 short side,
re-encoded as JPEG q95). Runs with 1 encoding process and with all cores, plus the bundled ``digits`` benchmark
(1797 8x8 PNGs, no resize). Each figure is the best of ``--reps`` runs into a fresh output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import make_synthetic_source  # noqa: E402

from sdlora_dist.data import load_manifest, prepare  # noqa: E402


def _rate(benchmark: str, root: Path | None, out: Path, workers: int, reps: int, tasks: int) -> dict:
    best = None
    for _ in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        prepare(benchmark, root, out, tasks=tasks, workers=workers, progress=False)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    manifest = load_manifest(out)
    n = sum(manifest.num_samples(s, t) for s in ("train", "test") for t in range(manifest.num_tasks()))
    return {"benchmark": benchmark, "workers": workers, "images": n, "seconds": round(best, 3),
            "images_per_s": round(n / best, 1)}  # fmt: skip


def main() -> None:
    """Time prepare and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/results/bench_prepare.json")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_synthetic_source(Path(tmp) / "src", args.images)
        rows = [_rate("imagefolder", root, Path(tmp) / "out", w, args.reps, 1) for w in sorted({1, cpus})]
        rows += [_rate("digits", None, Path(tmp) / "digits", w, args.reps, 5) for w in sorted({1, cpus})]
    result = {
        "benchmark": "prepare images/s written (read + resize to 256 short side + encode + tar + sha256)",
        "source": args.root or f"synthetic: {args.images} JPEGs 500x375 q90 (+10 test) in 10 classes; digits 8x8",
        "results": rows,
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version()},
        "command": "python bench/bench_prepare.py" + (f" --root {args.root}" if args.root else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
