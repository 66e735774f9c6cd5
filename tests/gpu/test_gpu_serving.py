"""Serving on CUDA: fp16 export against PyTorch on the CUDA provider, TensorRT when it loads, predict --provider."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import ENV
from PIL import Image

from sdlora_dist.config import load_config
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.verify import FP16_RELATIVE_TOLERANCE, tolerance_for
from sdlora_dist.model import build_model

pytestmark = pytest.mark.gpu
CLASSES = 4
TINY = ["model.name=vit_tiny_patch16_224", "model.weights=random",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 3, embed_dim: 48, num_heads: 3}"]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(SD-LoRA model after 2 tasks, fp32 file, fp16 file): seeded non-zero adapters, verified exports."""
    from sdlora_dist.export.onnx_export import export_onnx

    cfg = load_config(overrides=TINY)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        model.add_task(CLASSES)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (0.8 if p.numel() == 1 else 0.0))
        model.consolidate()
    model.eval()
    names = [f"class_{i}" for i in range(2 * CLASSES)]
    meta = metadata_from_pretrained_cfg(model.pretrained_cfg, class_names=names, num_tasks=2, config_hash=cfg.hash())
    root = tmp_path_factory.mktemp("gpu_export")
    fp32 = export_onnx(model.merge(), root / "fp32.onnx", metadata=meta, reference=model)
    fp16 = export_onnx(model.merge(), root / "fp16.onnx", metadata=meta, fp16=True, reference=model)
    assert all(c.passed for c in (*fp32.checks, *fp16.checks))
    return model, fp32.path, fp16.path


def _inputs(batch: int = 8) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def test_fp16_export_matches_pytorch_on_the_cuda_provider(exported):
    import onnxruntime as ort

    from sdlora_dist.export.inference import OnnxClassifier

    model, _, fp16_path = exported
    assert "CUDAExecutionProvider" in ort.get_available_providers(), "install onnxruntime-gpu: pip install '.[gpu]'"
    clf = OnnxClassifier(fp16_path, provider="cuda")
    assert clf.provider == "CUDAExecutionProvider"
    x = _inputs()
    with torch.no_grad():
        fp32_cpu = model(torch.from_numpy(x)).numpy()
        half_cuda = model.merge().half().cuda()(torch.from_numpy(x).half().cuda()).float().cpu().numpy()
    got = clf.run(x)
    tol = FP16_RELATIVE_TOLERANCE * max(1.0, float(np.abs(fp32_cpu).max()))
    assert np.abs(got - fp32_cpu).max() <= tol  # the stated fp16 tolerance against the fp32 reference
    assert np.abs(got - half_cuda).max() <= tol  # and PyTorch's own fp16 on the same GPU
    assert (got.argmax(1) == fp32_cpu.argmax(1)).mean() >= 0.75


def test_tensorrt_provider_when_it_loads(exported):
    import onnxruntime as ort

    from sdlora_dist.errors import UserError
    from sdlora_dist.export.inference import OnnxClassifier

    model, fp32_path, _ = exported
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no TensorrtExecutionProvider ({ort.get_available_providers()})")
    try:
        clf = OnnxClassifier(fp32_path, provider="tensorrt")
    except UserError as exc:
        pytest.skip(f"TensorRT provider did not load: {exc}")
    if clf.provider != "TensorrtExecutionProvider":
        pytest.skip(f"TensorRT provider did not load (libnvinfer missing?): the session fell back to {clf.provider}")
    x = _inputs()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    # TensorRT may pick TF32 or fp16 tactics for an fp32 graph: hold it to the fp16 tolerance
    assert np.abs(clf.run(x) - want).max() <= tolerance_for("fp16", want)


def test_predict_cli_with_cuda_provider(exported, tmp_path):
    _, fp32_path, _ = exported
    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate(((40, 50), (61, 30), (32, 32))):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    cli = [sys.executable, "-m", "sdlora_dist.cli.main", "predict", str(fp32_path), *files, "--top-k", "3"]
    runs = {p: subprocess.run([*cli, "--provider", p], capture_output=True, text=True, timeout=300, env=ENV)
            for p in ("cuda", "cpu")}  # fmt: skip
    for provider, out in runs.items():
        assert out.returncode == 0, f"{provider}: {out.stderr[-2000:]}"
    assert "CUDAExecutionProvider" in runs["cuda"].stderr
    cuda, cpu = ([json.loads(line) for line in runs[p].stdout.splitlines()] for p in ("cuda", "cpu"))
    assert [r["path"] for r in cuda] == files
    for a, b in zip(cuda, cpu, strict=True):
        assert a["top_k"][0]["class"] == b["top_k"][0]["class"]
        assert abs(a["top_k"][0]["score"] - b["top_k"][0]["score"]) <= 1e-3
