"""Run directories for the lifecycle tests (export --task, lineage, gate, publishing): seeded tiny SD-LoRA runs on
the session's digits shards, written through the real checkpoint code, without DeepSpeed (seconds, not minutes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_overrides
from model_helpers import set_current_in_span

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.config import load_config
from sdlora_dist.data.classes import resolve_split, task_view
from sdlora_dist.data.manifest import load_manifest
from sdlora_dist.model import SDLoRAViT, build_model


def start_run(run_dir: Path, shards: Path, *overrides: str) -> tuple[SDLoRAViT, list[int]]:
    """A fresh run directory (config, run.json as the recipe writes it, backbone); the model and classes per task."""
    cfg = load_config(overrides=tiny_overrides(f"data.shards={shards}", "data.benchmark=digits",
                                               f"run_dir={run_dir}", *overrides))  # fmt: skip
    manifest = load_manifest(shards)
    split = resolve_split(manifest, cfg.data)
    view = task_view(manifest, split)
    model = build_model(cfg)
    run_dir.mkdir(parents=True)
    info = {"benchmark": "digits", "shards": str(shards), "data_fingerprint": manifest.fingerprint,
            "class_names": view.class_names, "task_split": split.record(manifest.stored_names)}  # fmt: skip
    ckpt.write_run_header(run_dir, cfg, model, info)
    return model, list(split.classes_per_task)


def train_tasks(
    model: SDLoRAViT,
    run_dir: Path,
    per_task: list[int],
    tasks: range,
    *,
    in_span: tuple[int, ...] = (),
    after: Callable[[int], None] | None = None,
) -> None:
    """Tasks ``tasks`` at model level: close the open pair (KD may absorb it), open the next, move its trainable
    tensors by seeded noise (a stand-in for SGD), checkpoint; ``in_span``: tasks whose pair KD will absorb."""
    for t in tasks:
        if model.current_key is not None:
            model.consolidate()
        torch.manual_seed(1000 + t)
        model.add_task(per_task[t])
        gen = torch.Generator().manual_seed(7 + t)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if t in in_span:
            set_current_in_span(model, {k: 0.6 - 0.2 * i for i, k in enumerate(model.frozen_keys)})
        ckpt.save_task_checkpoint(run_dir, t, model, {"task": t})
        if after is not None:
            after(t)


def shard_crops(shards: Path, count: int = 40) -> np.ndarray:
    """uint8 (N, 32, 32, 3) eval crops of the shard set's test images (every task), for logit comparisons."""
    from sdlora_dist.data import TransformSpec, make_eval_loader

    spec = TransformSpec(32, (0.0, 0.0, 0.0), (1 / 255,) * 3, interpolation="bicubic", crop_pct=0.875)
    crops = []
    for task in range(load_manifest(shards).num_tasks()):
        for images, _ in make_eval_loader(shards, [task], spec=spec, batch_size=count // 5):
            crops.append(images.numpy().round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
            break
    return np.concatenate(crops)


def scramble_head(src: Path, dst: Path, rows: int) -> None:
    """Copy an exported model with the first ``rows`` rows of its classifier head (weight and bias) rotated by one:
    a model whose old classes answer each other's names, metadata and lineage unchanged. The head is the paper's
    ``head.weight``/``head.bias`` or the ridge head's last layer ``head.2.weight`` (its zero bias may be folded away
    by the exporter)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    classes = len(json.loads({p.key: p.value for p in proto.metadata_props}["sdlora.class_names"]))
    heads = [t for t in proto.graph.initializer if t.name.startswith("head.") and t.dims and t.dims[0] == classes]
    assert any(t.name.endswith("weight") for t in heads) and len(heads) <= 2, [t.name for t in heads]
    for tensor in heads:
        value = numpy_helper.to_array(tensor).copy()
        value[:rows] = np.roll(value[:rows], 1, axis=0)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    onnx.save(proto, str(dst))
