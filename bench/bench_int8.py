"""INT8 (onnxruntime dynamic quantization, ``sdlora export --int8``) vs fp32: file size, CPU latency, top-1 agreement.

    python bench/bench_int8.py [--run RUN_DIR] [--reps 9] [--batches 1 32] [--out bench/results/int8.json]

Size and latency: a merged ViT-S/16 at 224 with random weights (a merged SD-LoRA model is this graph with other
initializer values), both files on ORT's CPU provider with the same threads, graph optimisation "all", calls
interleaved, medians. Agreement: with ``--run``, the run is exported with ``--int8`` as the CLI does and the top-1 of
both files is compared over every test image of the tasks it learned (the shards the run was trained on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import sdlora_dist  # noqa: F401  (torchvision compat before timm)
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.onnx_export import export_onnx
from sdlora_dist.export.quantize import INT8_MIN_AGREEMENT, int8_path, quantize_int8, top1_agreement


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def latency(fp32: Path, int8: Path, batches: list[int], reps: int, threads: int) -> list[dict]:
    """Median ms per call of both files at each batch size (calls interleaved so noise hits both alike)."""
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for sess in sessions.values():  # warm-up
            sess.run(None, {"pixel_values": x})
        for _ in range(reps):
            for name, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, {"pixel_values": x})
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        rows.append({"batch": batch, "reps": reps, "median_ms": {k: round(v, 2) for k, v in med.items()},
                     "latency_ratio_int8_over_fp32": round(med["int8"] / med["fp32"], 3)})  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def run_agreement(run_dir: Path, tmp: Path) -> dict:
    """Export ``run_dir`` with --int8 as the CLI does, then compare top-1 over all its tasks' test images."""
    from sdlora_dist.checkpoint import load_run
    from sdlora_dist.export.from_run import export_run, real_test_images, run_metadata

    report = export_run(tmp / "run.onnx", run_dir=run_dir, int8=True)
    state = load_run(run_dir)
    images = real_test_images(state.shards, run_metadata(state), tasks=state.model.num_tasks, limit=10**6)
    agreement = top1_agreement(report.path, int8_path(report.path), images)
    return {"run": str(run_dir), "images": len(images), "top1_agreement": round(agreement, 4),
            "threshold": INT8_MIN_AGREEMENT, "fp32_bytes": report.file_bytes,
            "int8_bytes": int8_path(report.path).stat().st_size}  # fmt: skip


def main() -> None:
    """Run the benchmark and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--run", type=Path, default=None, help="A trained run for the agreement figure.")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="bench/results/int8.json")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100).eval()
    meta = metadata_from_pretrained_cfg(model.pretrained_cfg, class_names=[f"c{i}" for i in range(100)],
                                        num_tasks=10, config_hash="bench")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_"))
    fp32 = export_onnx(model, tmp / "fp32.onnx", metadata=meta).path
    # random inputs only verify that the file runs: the agreement figure comes from --run's real images
    images = np.random.default_rng(1).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    try:
        int8 = quantize_int8(fp32, images).path
    except Exception:  # noqa: BLE001  (random weights may disagree: quantize without the check for timing)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = int8_path(fp32)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    result = {
        "benchmark": "INT8 dynamic quantization vs fp32, onnxruntime CPU provider",
        "model": args.model, "threads": args.threads,
        "size": {"fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
                 "size_ratio_int8_over_fp32": round(int8.stat().st_size / fp32.stat().st_size, 4)},
        "latency": latency(fp32, int8, args.batches, args.reps, args.threads),
        "agreement": run_agreement(args.run, tmp) if args.run else None,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["size"]), json.dumps(result["agreement"]))


if __name__ == "__main__":
    main()
