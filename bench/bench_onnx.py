"""onnxruntime (CPU provider) vs PyTorch eager latency for a merged ViT-S/16 at 224, and the fp16 file size ratio.

    python bench/bench_onnx.py [--reps 15] [--batches 1 32] [--threads N] [--out bench/results/onnx.json]
    python bench/bench_onnx.py --device cuda --model vit_base_patch16_224 --batches 1 64 --out OUT.json

With ``--device cuda`` (run by ``bench/gpu_check.sh``) both files run on ORT's CUDA provider and PyTorch runs eager
on the GPU in the matching precision; latencies include copying the numpy input to the GPU and the logits back
(what a serving call costs), PyTorch's side likewise.

The model is ``vit_small_patch16_224`` with random weights (a merged SD-LoRA model is exactly this graph with other
initializer values). Both sides get the same thread count (default: all cores) and a warm-up; ORT runs with
``ORT_ENABLE_ALL`` graph optimisation and sequential execution, PyTorch in ``torch.inference_mode``. Timings
alternate ORT and PyTorch call by call, so machine noise hits both alike; the JSON holds medians and all settings.
The fp16 variant is exported and verified as ``sdlora export --fp16`` does; only its file size is compared here
(fp16 is for GPU providers; ORT's CPU provider runs it through inserted casts).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import sdlora_dist  # noqa: F401  (torchvision compat before timm)
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.onnx_export import export_onnx


def _ort_session(path: Path, threads: int, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _cuda_rows(model: torch.nn.Module, files: dict[str, Path], batches: list[int], reps: int) -> list[dict]:
    """ORT CUDA provider vs PyTorch eager on the GPU, fp32 and fp16, per batch size (medians of interleaved calls)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {p: ort.InferenceSession(str(f), sess_options=opts, providers=["CUDAExecutionProvider"])
                for p, f in files.items()}  # fmt: skip
    gpu = {"fp32": model.cuda().eval(), "fp16": copy.deepcopy(model).half().cuda().eval()}
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        runners = {}
        for precision in ("fp32", "fp16"):
            runners[f"ort_cuda_{precision}"] = lambda s=sessions[precision], x=x: s.run(None, {"pixel_values": x})
            dtype = torch.float16 if precision == "fp16" else torch.float32

            def run_torch(m: torch.nn.Module = gpu[precision], dtype: torch.dtype = dtype, x: np.ndarray = x) -> None:
                with torch.inference_mode():
                    m(torch.from_numpy(x).to("cuda", dtype)).float().cpu()

            runners[f"pytorch_cuda_{precision}"] = run_torch
        for fn in runners.values():  # warm-up: cuDNN/cuBLAS autotuning, ORT arena
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):
            for name, fn in runners.items():
                times[name] += _time(fn, 1)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        row = {"batch": batch, "reps": reps, "median_ms": {k: round(v, 3) for k, v in med.items()}}
        row["images_per_s"] = {k: round(batch / (v / 1000), 1) for k, v in med.items()}
        print(json.dumps(row))
        rows.append(row)
    return rows


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    """Run the benchmark and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="bench/results/onnx.json")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="ORT provider and PyTorch device")
    args = parser.parse_args()

    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False, num_classes=100).eval()
    meta = metadata_from_pretrained_cfg(
        model.pretrained_cfg, class_names=[f"c{i}" for i in range(100)], num_tasks=10, config_hash="bench"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    t0 = time.perf_counter()
    fp32 = export_onnx(model, tmp / "fp32.onnx", metadata=meta)
    export_s = time.perf_counter() - t0
    fp16 = export_onnx(model, tmp / "fp16.onnx", metadata=meta, fp16=True)
    if args.device == "cuda":
        report = {
            "benchmark": "onnxruntime CUDA provider vs PyTorch eager on the GPU, merged ViT forward, fp32 and fp16",
            "model": args.model,
            "command": "python bench/bench_onnx.py " + " ".join(sys.argv[1:]),
            "results": _cuda_rows(model, {"fp32": fp32.path, "fp16": fp16.path}, args.batches, args.reps),
            "export": {"verify_max_abs_diff_fp16": fp16.checks[0].max_abs_diff,
                       "fp16_tolerance": fp16.checks[0].tolerance},
            "machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                        "onnxruntime": ort.__version__},
        }  # fmt: skip
        _write(Path(args.out), report)
        shutil.rmtree(tmp, ignore_errors=True)
        return

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    sessions = {name: _ort_session(fp32.path, args.threads, lvl) for name, lvl in levels.items()}
    results = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x)
        reps = max(3, args.reps if batch <= 8 else args.reps // 2)

        def run_torch(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                model(xt)

        runners = {"pytorch_eager": run_torch}
        for name, sess in sessions.items():
            runners[f"ort_{name}"] = lambda s=sess, x=x: s.run(None, {"pixel_values": x})
        for fn in runners.values():  # warm-up (allocators, ORT arena, oneDNN primitives)
            fn(), fn()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):  # alternate so noise hits every runner alike
            for name, fn in runners.items():
                times[name] += _time(fn, 1)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        best_ort = min(med["ort_all"], med["ort_basic"])
        row = {
            "batch": batch,
            "reps": reps,
            "median_ms": {k: round(v, 2) for k, v in med.items()},
            "ratio_ort_all_over_pytorch": round(med["ort_all"] / med["pytorch_eager"], 3),
            "ratio_best_ort_over_pytorch": round(best_ort / med["pytorch_eager"], 3),
            "ort_images_per_s": round(batch / (med["ort_all"] / 1000), 1),
            "pytorch_images_per_s": round(batch / (med["pytorch_eager"] / 1000), 1),
        }
        print(json.dumps(row))
        results.append(row)

    report = {
        "benchmark": "onnxruntime CPU vs PyTorch eager, merged ViT forward",
        "model": args.model,
        "input": "float32 (B, 3, 224, 224)",
        "settings": {
            "threads": args.threads,
            "torch_threads": torch.get_num_threads(),
            "ort_intra_op_threads": args.threads,
            "ort_execution_mode": "sequential",
            "ort_graph_optimization": list(levels),
            "pytorch": "eager, torch.inference_mode, fp32",
            "warmup_calls": 2,
            "timing": "interleaved per call, median",
        },
        "results": results,
        "export": {
            "seconds_fp32_incl_verify": round(export_s, 1),
            "nodes": fp32.num_nodes,
            "verify_max_abs_diff_fp32": fp32.checks[0].max_abs_diff,
            "verify_max_abs_diff_fp16": fp16.checks[0].max_abs_diff,
            "fp16_tolerance": fp16.checks[0].tolerance,
            "fp32_bytes": fp32.file_bytes,
            "fp16_bytes": fp16.file_bytes,
            "fp16_size_ratio": round(fp16.file_bytes / fp32.file_bytes, 4),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    _write(Path(args.out), report)
    shutil.rmtree(tmp, ignore_errors=True)


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
