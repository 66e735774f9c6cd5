"""The embedded end-to-end demo: digits shards -> multi-rank SD-LoRA training -> report -> ONNX -> predictions ->
the release gate between the 4-task and the 5-task model (the step that decides whether an update ships).

Everything runs on scikit-learn's bundled digits, so it needs no download: it is the README's first command and
the quickest way to see every stage of the product work on a laptop or a CI machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_write_text
from sdlora_dist.logs import log_rank_zero


@dataclass
class DemoResult:
    """Where the demo put its outputs, and how long each stage took (seconds)."""

    shards: Path
    run_dir: Path
    onnx: Path
    predictions: Path
    report_dir: Path
    summary: dict[str, float]
    times: dict[str, float] = field(default_factory=dict)
    gate_report: Path | None = None  # out/gate_report.json: model.onnx (5 tasks) against model_task3.onnx (4 tasks)
    gate_passed: bool | None = None


def write_sample_images(folder: Path, per_class: int = 2) -> list[Path]:
    """A few digits from the end of the bundled set (as PNG files) for ``predict``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label in range(10):
        for i, index in enumerate(np.flatnonzero(digits.target == label)[-per_class:]):
            path = folder / f"digit{label}_{i}.png"
            Image.fromarray((digits.images[index] * 255 / 16).astype("uint8")).save(path)
            paths.append(path)
    return paths


def run_demo(
    out: str | Path, *, ranks: int = 2, overrides: list[str] | None = None, backbone_steps: int = 400
) -> DemoResult:
    """Run every stage into ``out`` (backbone.safetensors, shards/, runs/<time>/, model.onnx, predictions.jsonl).

    The backbone is a tiny ViT pre-trained on synthetic glyphs (``toy_backbone``), loaded through
    ``model.weights`` like a real checkpoint; it is trained once and reused by later demo runs in ``out``.
    """
    from sdlora_dist.data import prepare
    from sdlora_dist.export.from_run import export_run
    from sdlora_dist.export.gate import run_gate
    from sdlora_dist.export.inference import OnnxClassifier, predict_files
    from sdlora_dist.jobs.frontdoor import resolve_config, start_training
    from sdlora_dist.jobs.launch import LaunchSpec
    from sdlora_dist.recipe import timed
    from sdlora_dist.report import write_report
    from sdlora_dist.toy_backbone import pretrain_toy_backbone

    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()
    shards = out / "shards" / "digits"
    with timed(times, "prepare"):
        prepare("digits", None, shards)
    backbone = out / "backbone.safetensors"
    with timed(times, "backbone"):
        if not backbone.is_file():
            recipe = resolve_config("digits", None, list(overrides or []), str(shards), None)
            log_rank_zero(
                f"pre-training the demo's tiny ViT on synthetic glyphs ({backbone_steps} steps) -> {backbone}"
            )
            pretrain_toy_backbone(recipe.model, backbone, steps=backbone_steps)
    run_dir = out / "runs" / time.strftime("digits-%Y%m%d-%H%M%S")
    cfg = resolve_config("digits", None, [f"model.weights={backbone}", *(overrides or [])], str(shards), str(run_dir))
    log_rank_zero(f"training {cfg.train.epochs} epochs per task on {ranks} rank(s) -> {run_dir}")
    with timed(times, "train"):
        code = start_training(cfg, "fresh", LaunchSpec(procs_per_node=ranks))
    if code != 0:
        raise UserError(f"the demo's training failed (exit code {code}); its messages are above")
    with timed(times, "report"):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        report = write_report(run_dir)
    onnx_path, previous = out / "model.onnx", out / "model_task3.onnx"
    with timed(times, "export"):
        export_run(previous, run_dir=run_dir, task=3)  # the model production had before task 4 (its parent)
        export_run(onnx_path, run_dir=run_dir)
    predictions = out / "predictions.jsonl"
    with timed(times, "predict"):
        samples = write_sample_images(out / "samples")
        found = predict_files(OnnxClassifier(onnx_path), [str(p) for p in samples], top_k=3)
        lines = [p.to_json() for p in found]
        atomic_write_text(predictions, "\n".join(lines) + "\n")
    with timed(times, "gate"):
        gate = run_gate(onnx_path, previous, shards)
        gate_report = out / "gate_report.json"
        atomic_write_text(gate_report, json.dumps(gate.to_dict(), indent=2) + "\n")
    times["total"] = time.perf_counter() - start

    log_rank_zero(f"report: {report.markdown}\nmodel: {onnx_path}\npredictions: {predictions} (first: {lines[0]})")
    log_rank_zero(f"release gate: {onnx_path.name} (5 tasks) against {previous.name} (4 tasks)\n{gate.table()}\n"
                  f"gate report: {gate_report}")  # fmt: skip
    summary = {k: metrics["accuracy"][k] for k in ("acc", "aaa", "mean_task_acc", "forgetting", "bwt")}
    return DemoResult(
        shards, run_dir, onnx_path, predictions, report.out_dir, summary, times, gate_report, gate.passed
    )
