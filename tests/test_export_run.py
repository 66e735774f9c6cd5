"""End to end from a run directory on real digits shards: ``sdlora export`` (default run discovery, Triton, real-image
verification), ``sdlora evaluate`` == the PyTorch evaluation, and the bad-run errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from shard_servers import http_server

from sdlora_dist.checkpoint import load_run, save_task_checkpoint, write_run_header
from sdlora_dist.cli.main import main
from sdlora_dist.config import load_config
from sdlora_dist.data import make_eval_loader
from sdlora_dist.data.manifest import load_manifest
from sdlora_dist.export.inference import OnnxClassifier
from sdlora_dist.model import build_model
from sdlora_dist.preprocess import transform_spec

pytestmark = pytest.mark.slow
TASKS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """digits (bundled in scikit-learn) as 5 tasks of 2 classes, stored at 32 px, through the real CLI."""
    out = tmp_path_factory.mktemp("data") / "digits"
    argv = ["data", "prepare", "--benchmark", "digits", "--out", str(out), "--tasks", "5", "--resize", "32"]
    assert main([*argv, "--workers", "1"]) == 0
    return out


def write_run(run_dir: Path, shards: Path, tasks: int) -> None:
    """A run directory in the checkpoint schema: 3 tasks of the digits shards, adapters/head seeded non-zero."""
    manifest = load_manifest(shards)
    cfg = load_config(overrides=tiny_overrides(f"data.shards={shards}", "data.benchmark=digits", f"run_dir={run_dir}"))
    model = build_model(cfg)
    run_dir.mkdir(parents=True)
    write_run_header(run_dir, cfg, model, {"benchmark": "digits", "shards": str(shards),
                                            "class_names": manifest.class_names})  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for task in range(tasks):
        model.add_task(manifest.classes_per_task[task])
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (0.8 if p.numel() == 1 else 0.0))
        model.consolidate()
        save_task_checkpoint(run_dir, task, model, {"task": task})


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    """``sdlora export`` run from a folder holding ./runs/<run>, with no --run (discovery) and --triton."""
    root = tmp_path_factory.mktemp("work")
    write_run(root / "runs" / "exp1", shards, TASKS)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        argv = ["export", "model.onnx", "--triton", "triton_repo", "--verify-images", "24"]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return root


def test_export_from_run_matches_the_run_model(exported, shards):
    root = exported
    assert (root / "model.onnx").is_file()
    assert (root / "triton_repo" / "model" / "1" / "model.onnx").is_file()
    state = load_run(root / "runs" / "exp1")
    clf = OnnxClassifier(root / "model.onnx", provider="cpu")
    assert clf.metadata.num_tasks == TASKS and clf.metadata.config_hash == state.config_hash
    assert list(clf.metadata.class_names) == load_manifest(shards).class_names[: 2 * TASKS]
    spec = transform_spec(state.model, state.config.data)
    assert clf.metadata.mean == tuple(spec.mean) and clf.metadata.crop_pct == spec.crop_pct
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = state.model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(clf.run(x) - want).max() <= 1e-4


def test_evaluate_equals_pytorch_evaluation(exported, shards, capsys):
    root = exported
    state = load_run(root / "runs" / "exp1")
    spec = transform_spec(state.model, state.config.data)
    correct = total = 0
    model = state.model.eval()
    with torch.no_grad():
        for images, labels in make_eval_loader(shards, list(range(TASKS)), spec=spec, batch_size=64):
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    capsys.readouterr()
    assert main(["evaluate", str(root / "model.onnx"), "--data", str(shards), "--batch-size", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    manifest = load_manifest(shards)
    assert total == sum(manifest.num_samples("test", t) for t in range(TASKS)) == result["total"]
    assert result["correct"] == correct
    assert sorted(result["per_task"]) == ["0", "1", "2"]
    with http_server(shards.parent) as server:  # the same shards streamed over HTTP: the same counts
        argv = ["evaluate", str(root / "model.onnx"), "--data", f"{server.url}/digits", "--batch-size", "50"]
        assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_evaluate_with_preprocessing_model_equals_pytorch_too(exported, shards, tmp_path, capsys):
    root = exported
    out = tmp_path / "pre.onnx"
    assert main(["export", str(out), "--run", str(root / "runs" / "exp1"), "--with-preprocessing"]) == 0
    assert "verified images" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--data", str(shards)]) == 0
    pre = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(root / "model.onnx"), "--data", str(shards)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert pre["correct"] == plain["correct"] and pre["total"] == plain["total"]


def test_bad_runs(shards, tmp_path, capsys):
    empty = tmp_path / "runs" / "fresh"
    cfg = load_config(overrides=tiny_overrides(f"data.shards={shards}", "data.benchmark=digits"))
    empty.mkdir(parents=True)
    write_run_header(empty, cfg, build_model(cfg), {"shards": str(shards)})
    assert main(["export", str(tmp_path / "m.onnx"), "--run", str(empty)]) == 2
    assert "has no completed task" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m.onnx"), "--runs-root", str(tmp_path / "runs")]) == 2
    assert "no run with a completed task under" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m.onnx"), "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
