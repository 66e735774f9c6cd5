"""The README's first command, through its library entry, on a reduced budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from sdlora_dist.checkpoint import load_run
    from sdlora_dist.demo import run_demo
    from sdlora_dist.export.inference import OnnxClassifier
    from sdlora_dist.export.preprocess import image_to_uint8

    result = run_demo(
        tmp_path / "demo",
        ranks=2,
        overrides=["train.epochs=1", "train.max_steps_per_epoch=4", "train.timeout_s=60"],
        backbone_steps=10,
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(metrics["accuracy"]["matrix"]) == 5 and [t["world_size"] for t in metrics["tasks"]] == [2] * 5
    assert result.summary["acc"] == pytest.approx(metrics["accuracy"]["acc"])
    for name in ("accuracy_matrix.png", "accuracy_curve.png", "magnitudes.png", "time_per_task.png", "report.md"):
        assert (result.report_dir / name).stat().st_size > 0
    lines = [json.loads(line) for line in result.predictions.read_text().splitlines()]
    assert len(lines) == 20 and all(len(line["top_k"]) == 3 for line in lines)

    # ONNX predictions agree with the PyTorch model of the run on the same preprocessed images
    classifier = OnnxClassifier(result.onnx)
    crops = np.stack([image_to_uint8(line["path"], classifier.metadata) for line in lines])
    onnx_logits = classifier.run(classifier.prepare(crops))
    model = load_run(result.run_dir).model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(classifier.prepare(crops))).numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4
    names = classifier.metadata.class_names
    assert [line["top_k"][0]["class"] for line in lines] == [names[i] for i in torch_logits.argmax(1)]

    # the demo ends with the release gate: 5-task model against the 4-task one, evaluated by onnxruntime
    gate = json.loads(result.gate_report.read_text())
    assert gate["passed"] is result.gate_passed and len(gate["tasks"]) == 5
    assert [t["correct"] for t in gate["tasks"]] == metrics["accuracy"]["correct"][-1]
    assert [c for row in gate["tasks"][:4] for c in row["classes"]] == [c["class"] for c in gate["classes"]]


@pytest.mark.slow  # builds the demo backbone: over 2 s
def test_toy_backbone_loads_as_local_weights(tmp_path):
    """The glyph-pretrained file is a plain timm state dict that model.weights accepts, and training changed it."""
    from safetensors.torch import load_file

    from sdlora_dist.jobs.frontdoor import resolve_config
    from sdlora_dist.model import build_model
    from sdlora_dist.toy_backbone import glyph_dataset, pretrain_toy_backbone

    x, y = glyph_dataset(classes=4, per_class=3, size=16, seed=0)
    assert (
        x.shape == (12, 3, 16, 16)
        and x.min() >= -1
        and x.max() <= 1
        and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    )
    recipe = resolve_config("digits", None, [], "unused", str(tmp_path / "run"))
    path = pretrain_toy_backbone(recipe.model, tmp_path / "backbone.safetensors", steps=3, classes=4, per_class=8)
    cfg = resolve_config("digits", None, [f"model.weights={path}"], "unused", str(tmp_path / "run"))
    model = build_model(cfg)
    saved = load_file(str(path))
    assert torch.equal(model.backbone.patch_embed.proj.weight, saved["patch_embed.proj.weight"])
    import timm

    torch.manual_seed(7)  # the pre-training's seed: the same init, before its optimizer steps
    init = timm.create_model(recipe.model.name, num_classes=4, **recipe.model.kwargs).state_dict()
    assert not torch.equal(init["blocks.0.mlp.fc1.weight"], saved["blocks.0.mlp.fc1.weight"])
    assert init["blocks.0.mlp.fc1.weight"].shape == saved["blocks.0.mlp.fc1.weight"].shape
    assert not list(tmp_path.glob(".*.tmp"))
