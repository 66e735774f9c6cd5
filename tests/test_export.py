"""ONNX export of a tiny SD-LoRA model after 3 tasks: numbers against PyTorch, graph, metadata, variants, failures."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_overrides

from sdlora_dist import __version__
from sdlora_dist.config import load_config
from sdlora_dist.errors import UserError
from sdlora_dist.export.inference import OnnxClassifier
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.onnx_export import export_onnx
from sdlora_dist.export.preprocess import normalize
from sdlora_dist.export.triton import write_triton_repo
from sdlora_dist.export.verify import FP16_RELATIVE_TOLERANCE
from sdlora_dist.model import build_model

pytestmark = pytest.mark.slow  # module fixtures export several models (~3 s each on 2 cores)
CLASSES_PER_TASK = 4


def trained_model(tasks: int = 3):
    """A tiny SD-LoRA model after ``tasks`` tasks, adapters and head set to seeded random values (not zero)."""
    cfg = load_config(overrides=tiny_overrides())
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(7)
    for _ in range(tasks):
        model.add_task(CLASSES_PER_TASK)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (0.8 if p.numel() == 1 else 0.0))
        model.consolidate()
    return cfg, model.eval()


@pytest.fixture(scope="module")
def run_model():
    """(cfg, SD-LoRA model after 3 tasks, metadata dict)."""
    cfg, model = trained_model()
    meta = metadata_from_pretrained_cfg(
        model.pretrained_cfg,
        class_names=[f"class_{i}" for i in range(3 * CLASSES_PER_TASK)],
        num_tasks=model.num_tasks,
        config_hash=cfg.hash(),
    )
    return cfg, model, meta


@pytest.fixture(scope="module")
def exported(run_model, tmp_path_factory):
    """The fp32 export of the merged model, verified against the unmerged one."""
    _, model, meta = run_model
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(model.merge(), path, metadata=meta, reference=model)
    return path, report


def test_onnx_matches_adapter_model_at_batch_1_3_8(run_model, exported):
    _, model, _ = run_model
    path, report = exported
    clf = OnnxClassifier(path, provider="cpu")
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        with torch.no_grad():
            want = model(x).numpy()  # the adapter model's forward, not the merged one
        got = clf.run(x.numpy())
        assert got.shape == (batch, 3 * CLASSES_PER_TASK)
        assert np.abs(got - want).max() <= 1e-4
        assert (got.argmax(1) == want.argmax(1)).all()
    assert report.checks[0].name == "random" and report.checks[0].batch_sizes == (1, 3, 8)
    assert report.checks[0].max_abs_diff <= 1e-4


def test_adapters_matter_so_the_comparison_can_fail(run_model):
    # Were the merge to drop the adapters, logits would move by far more than the 1e-4 tolerance.
    _, model, _ = run_model
    merged = model.merge()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in model.block_ids:
            merged.blocks[i].attn.qkv.weight.copy_(model.backbone.blocks[i].attn.qkv.base_layer.weight)
        assert (merged(x) - model(x)).abs().max() > 1e-2


def test_metadata_reads_back(run_model, exported):
    cfg, _, meta = run_model
    path, _ = exported
    m = OnnxClassifier(path, provider="cpu").metadata
    assert list(m.class_names) == meta["class_names"]
    assert m.num_tasks == 3 and m.config_hash == cfg.hash() and m.package_version == __version__
    assert m.input_size == (3, 32, 32) and m.interpolation == "bicubic" and m.crop_pct == pytest.approx(0.9)
    assert m.mean == (0.5, 0.5, 0.5) and m.std == (0.5, 0.5, 0.5)
    assert m.input_layout == "NCHW_float32" and m.precision == "fp32"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["sdlora.class_names"].startswith('["class_0", "class_1"')


def test_graph_equals_plain_timm_vit_export(run_model, exported, tmp_path):
    import timm

    _, model, meta = run_model
    path, _ = exported
    kwargs = load_config(overrides=tiny_overrides()).model.kwargs
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=12, **kwargs).eval()
    plain_report = export_onnx(plain, tmp_path / "plain.onnx", metadata=meta)
    ours, base = onnx.load(str(path)).graph, onnx.load(str(tmp_path / "plain.onnx")).graph
    assert len(ours.node) == len(base.node) == plain_report.num_nodes
    assert collections.Counter(n.op_type for n in ours.node) == collections.Counter(n.op_type for n in base.node)
    assert [(v.name, str(v.type)) for v in (*ours.input, *ours.output)] == [
        (v.name, str(v.type)) for v in (*base.input, *base.output)
    ]


def test_fp16_variant_within_stated_tolerance_and_half_the_size(run_model, exported, tmp_path):
    _, model, meta = run_model
    fp32_path, _ = exported
    report = export_onnx(model.merge(), tmp_path / "half.onnx", metadata=meta, fp16=True, reference=model)
    clf = OnnxClassifier(report.path, provider="cpu")
    assert clf.metadata.precision == "fp16"
    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    diff = np.abs(clf.run(x) - want).max()
    assert 0 < diff <= FP16_RELATIVE_TOLERANCE * max(1.0, np.abs(want).max())
    assert report.checks[0].tolerance >= FP16_RELATIVE_TOLERANCE and report.checks[0].passed
    assert 0.45 <= report.file_bytes / fp32_path.stat().st_size <= 0.6
    fp16_inits = [i for i in onnx.load(str(report.path)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16_inits) >= 10


def test_with_preprocessing_equals_python_preprocessing_then_plain_model(run_model, exported, tmp_path):
    _, model, meta = run_model
    plain_path, _ = exported
    report = export_onnx(model.merge(), tmp_path / "pre.onnx", metadata=meta, with_preprocessing=True)
    assert report.input_name == "image" and report.input_layout == "NHWC_uint8"
    pre, plain = OnnxClassifier(report.path, provider="cpu"), OnnxClassifier(plain_path, provider="cpu")
    images = np.random.default_rng(4).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    in_graph = pre.run(images)
    in_python = plain.run(normalize(images, meta["mean"], meta["std"]))
    assert np.abs(in_graph - in_python).max() <= 1e-4
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(normalize(images, meta["mean"], meta["std"]))).numpy()
    assert np.abs(in_graph - torch_logits).max() <= 1e-4
    with pytest.raises(Exception, match="uint8|type"):
        pre.run(images.astype(np.float32))


def test_failed_verification_leaves_no_file_and_keeps_the_old_one(run_model, tmp_path):
    _, model, meta = run_model
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    # fp16 really differs from fp32 PyTorch by ~1e-4; a 1e-7 tolerance must fail the export.
    with pytest.raises(UserError, match="verification failed.*not written.*max abs diff"):
        export_onnx(model.merge(), target, metadata=meta, fp16=True, tolerance=1e-7)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_refuses_unmerged_model_bad_opset_and_bad_metadata(run_model, tmp_path):
    _, model, meta = run_model
    with pytest.raises(TypeError, match="merge"):
        export_onnx(model, tmp_path / "m.onnx", metadata=meta)
    with pytest.raises(UserError, match="--opset must be between 17 and 23 .got 11"):
        export_onnx(model.merge(), tmp_path / "m.onnx", metadata=meta, opset=11)
    with pytest.raises(ValueError, match="12 outputs, metadata lists 3"):
        export_onnx(model.merge(), tmp_path / "m.onnx", metadata={**meta, "class_names": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="interpolation: must be one of"):
        export_onnx(model.merge(), tmp_path / "m.onnx", metadata={**meta, "interpolation": "cubic"})
    assert list(tmp_path.iterdir()) == []


def test_triton_repository(exported, tmp_path):
    import onnxruntime as ort

    path, _ = exported
    folder = write_triton_repo(path, tmp_path / "repo", model_name="sdlora_vit", max_batch_size=16)
    assert folder == tmp_path / "repo" / "sdlora_vit"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt",
    ]  # fmt: skip
    config = (folder / "config.pbtxt").read_text()
    for line in ('name: "sdlora_vit"', 'platform: "onnxruntime_onnx"', "max_batch_size: 16", 'name: "pixel_values"',
                 "data_type: TYPE_FP32", "dims: [ 3, 32, 32 ]", 'name: "logits"', "dims: [ 12 ]",
                 "dynamic_batching {", "preferred_batch_size: [ 8, 16 ]", 'label_filename: "labels.txt"'):  # fmt: skip
        assert line in config, line
    assert (folder / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(12)]
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixel_values": np.zeros((16, 3, 32, 32), np.float32)})[0].shape == (16, 12)
    # Re-writing replaces the entry whole; nothing else is left in the repository.
    write_triton_repo(path, tmp_path / "repo", model_name="sdlora_vit", max_batch_size=4)
    assert "max_batch_size: 4" in (folder / "config.pbtxt").read_text()
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["sdlora_vit"]
    with pytest.raises(UserError, match="model name"):
        write_triton_repo(path, tmp_path / "repo", model_name="bad name")
