"""Loader images/s feeding one GPU: the training pipeline (PIL decode + train transform in worker processes) with
each batch copied to the GPU, as the recipe consumes it.

    python bench/bench_gpu_loader.py [--images 2048] [--workers 4 8 16] [--out bench/results/loader_gpu.json]

Synthetic photo-like JPEGs (``bench_loader.make_synthetic_source``, 500x375) are written as shards by ``prepare``
(256 short side), then one task's epochs are read at batch 128, 224 px. The decode is the pipeline's own (PIL, the
one the recipe uses): images/s per GPU is what ``--workers`` decode processes sustain. ``--device cpu`` is only a
smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import SPEC, make_synthetic_source  # noqa: E402

from sdlora_dist.data import make_train_loader, prepare  # noqa: E402

BATCH = 128


def epoch_images_per_s(shards: Path, workers: int, epoch: int, device: str) -> float:
    """One epoch of task 0 at ``workers`` decode processes, every batch on ``device`` before the next is taken."""
    start = time.perf_counter()
    images = 0
    loader = make_train_loader(shards, 0, spec=SPEC, batch_size=BATCH, epoch=epoch, seed=0, num_workers=workers)
    for x, y in loader:
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        images += x.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    """Write the shards, time the epochs, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({4, 8, os.cpu_count() or 8}))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per worker count (after one warm-up)")
    parser.add_argument("--out", default="bench/results/loader_gpu.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: bench_gpu_loader.py needs a CUDA device (--device cpu: smoke run only)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_source(Path(tmp) / "src", args.images)
        shards = Path(tmp) / "shards"
        prepare("imagefolder", root, shards, tasks=1, shard_size=256, progress=False)
        for workers in args.workers:
            epoch_images_per_s(shards, workers, 0, args.device)  # warm-up: worker start, page cache
            rates = [epoch_images_per_s(shards, workers, e + 1, args.device) for e in range(args.epochs)]
            rows.append(
                {"workers": workers, "images_per_s": [round(r, 1) for r in rates], "best": round(max(rates), 1)}
            )
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "train loader images/s into one GPU (PIL decode, RandomResizedCrop 224, flip, batch 128)",
        "command": "python bench/bench_gpu_loader.py " + " ".join(sys.argv[1:]),
        "source": f"synthetic: {args.images} JPEGs 500x375 q90, shards at 256 short side",
        "results": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "platform": platform.platform(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
