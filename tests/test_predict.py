"""``sdlora predict`` and serving-side preprocessing: JSON lines, per-file errors, providers, bad model files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from sdlora_dist.cli.main import main
from sdlora_dist.errors import UserError
from sdlora_dist.export.inference import resolve_providers
from sdlora_dist.export.metadata import metadata_from_pretrained_cfg
from sdlora_dist.export.onnx_export import export_onnx
from sdlora_dist.export.preprocess import image_to_uint8, normalize

NAMES = [f"digit_{i}" for i in range(10)]

pytestmark = pytest.mark.slow  # the module fixture exports two ONNX models (~15 s on 2 cores)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A seeded tiny plain ViT, its fp32 export and its --with-preprocessing export, and a folder of test files."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=10,
    ).eval()  # fmt: skip
    cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406)}
    cfg["std"] = (0.229, 0.224, 0.225)
    meta = metadata_from_pretrained_cfg(cfg, class_names=NAMES, num_tasks=2, config_hash="0123456789abcdef")
    root = tmp_path_factory.mktemp("serve")
    plain = export_onnx(model, root / "plain.onnx", metadata=meta).path
    pre = export_onnx(model, root / "pre.onnx", metadata=meta, with_preprocessing=True).path
    rng = np.random.default_rng(0)
    files = root / "files"
    files.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(files / "tall.png")
    Image.fromarray(rng.integers(0, 256, (30, 61, 3), dtype=np.uint8)).save(files / "wide.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(files / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(files / "rgba.png")
    (files / "notes.jpg").write_text("this is not an image")
    return model, meta, plain, pre, files


def test_preprocessing_equals_timm_eval_transform_and_the_data_pipeline(served):
    """Serving and the eval loader share one crop (``data.transforms.resize_center_crop``); what differs and is
    compared here: the file path (``load_rgb``) against decoded PIL images, numpy HWC normalisation against the
    loader's uint8 CHW + fused torch multiply-add, and both against timm's own eval transform."""
    from data_fixtures import eval_transform
    from timm.data import create_transform

    from sdlora_dist.data import TransformSpec
    from sdlora_dist.data.images import open_rgb
    from sdlora_dist.export.metadata import ModelMetadata

    model, meta_dict, _, _, files = served
    meta = ModelMetadata.from_dict(meta_dict)
    timm_tf = create_transform(
        input_size=meta.input_size, interpolation=meta.interpolation, mean=meta.mean, std=meta.std,
        crop_pct=meta.crop_pct, is_training=False,
    )  # fmt: skip
    spec = TransformSpec(32, meta.mean, meta.std, interpolation=meta.interpolation, crop_pct=meta.crop_pct)
    for name in ("tall.png", "wide.jpg", "gray.png", "rgba.png"):
        ours = normalize(image_to_uint8(files / name, meta)[None], meta.mean, meta.std)[0]
        img = open_rgb(files / name)  # the shared loader: rgba.png is composited on white, not stripped of alpha
        pipeline = eval_transform(img, spec).numpy()
        assert np.abs(ours - pipeline).max() <= 1e-5, name
        timm_x = timm_tf(img).numpy()
        assert timm_x.shape == ours.shape and np.abs(ours - timm_x).max() <= 1e-5, name


def test_predict_prints_json_lines_and_reports_bad_files(served, capsys):
    model, meta_dict, plain, _, files = served
    paths = [files / "tall.png", files / "notes.jpg", files / "missing.png", files / "wide.jpg", files / "gray.png"]
    rc = main(["predict", str(plain), *map(str, paths), "--top-k", "3", "--batch-size", "2", "--provider", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in lines] == [str(files / n) for n in ("tall.png", "wide.jpg", "gray.png")]
    err_lines = err.splitlines()
    assert "CPUExecutionProvider" in err_lines[0]
    assert sum("notes.jpg: not a readable image" in e for e in err_lines) == 1
    assert sum("missing.png: no such file" in e for e in err_lines) == 1
    assert err_lines[-1] == "error: 2 of 5 files could not be predicted (see the lines above)"
    for row in lines:  # against PyTorch on the same preprocessing
        x = normalize(image_to_uint8(row["path"], _meta(meta_dict))[None], meta_dict["mean"], meta_dict["std"])
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x)), dim=1)[0].numpy()
        top = np.argsort(-probs)[:3]
        assert [c["class"] for c in row["top_k"]] == [NAMES[i] for i in top]
        assert np.allclose([c["score"] for c in row["top_k"]], probs[top], atol=1e-5)


def _meta(meta_dict):
    from sdlora_dist.export.metadata import ModelMetadata

    return ModelMetadata.from_dict(meta_dict)


def test_predict_with_preprocessing_model_gives_the_same_answers(served, capsys):
    _, _, plain, pre, files = served
    paths = [str(files / n) for n in ("tall.png", "wide.jpg", "gray.png", "rgba.png")]
    assert main(["predict", str(plain), *paths, "--top-k", "10"]) == 0
    a = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(pre), *paths, "--top-k", "10", "--batch-size", "3"]) == 0
    b = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        sa = {c["class"]: c["score"] for c in ra["top_k"]}
        sb = {c["class"]: c["score"] for c in rb["top_k"]}
        assert sa.keys() == sb.keys() == set(NAMES)
        assert max(abs(sa[k] - sb[k]) for k in sa) <= 1e-5


def test_provider_choice_and_errors(served, capsys):
    _, _, plain, _, files = served
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider",
    ]  # fmt: skip
    assert (
        resolve_providers("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])[
            0
        ]
        == "TensorrtExecutionProvider"
    )
    with pytest.raises(
        UserError, match="provider 'cuda' needs CUDAExecutionProvider.*installed: CPUExecutionProvider"
    ):
        resolve_providers("cuda", ["CPUExecutionProvider"])
    rc = main(["predict", str(plain), str(files / "tall.png"), "--provider", "rocm"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: unknown provider 'rocm': valid are cuda, tensorrt, cpu" in err


def test_bad_model_files(served, tmp_path, capsys):
    _, _, plain, _, files = served
    image = str(files / "tall.png")
    assert main(["predict", str(tmp_path / "nope.onnx"), image]) == 2
    assert "nope.onnx does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(plain.read_bytes()[:5000])  # truncated download
    assert main(["predict", str(corrupt), image]) == 2
    assert "corrupt.onnx is not a loadable ONNX model" in capsys.readouterr().err
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(plain))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    assert main(["predict", str(foreign), image]) == 2
    assert "has no sdlora metadata" in capsys.readouterr().err
    assert main(["predict", str(plain), image, "--top-k", "0"]) == 2
    assert "--top-k must be > 0" in capsys.readouterr().err
    assert main(["evaluate", str(plain), "--data", str(tmp_path / "no_shards")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
