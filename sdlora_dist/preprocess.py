"""The input preprocessing of a run: which mean/std, size, interpolation and crop the backbone is fed.

One source of truth for training (``recipe``), the run's ``run.json`` and the export metadata (``export.from_run``):
the backbone's timm pretrained cfg, overlaid with ``model.mean/std/interpolation/crop_pct`` (explicit, or taken
from the weights file by the front door), then ``data.normalize`` choosing which mean/std to use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdlora_dist.config import DataConfig, ModelConfig
from sdlora_dist.data import TransformSpec

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# data.normalize (config.Normalize) -> (mean, std), given the backbone's pretrained cfg (with model.mean/std laid
# over it by the front door, see model.py)
NORMALIZE_STATS: dict[str, Callable[[dict[str, Any]], Stats]] = {
    "model": lambda pcfg: (tuple(pcfg.get("mean", (0.5,) * 3)), tuple(pcfg.get("std", (0.5,) * 3))),
    "none": lambda pcfg: ((0.0,) * 3, (1.0,) * 3),  # the reference code feeds [0, 1] inputs (reference-sdlora.md s.5)
    "imagenet": lambda pcfg: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": lambda pcfg: ((0.5,) * 3, (0.5,) * 3),
}


def transform_spec(model: Any, data: DataConfig) -> TransformSpec:
    """Preprocessing of ``model`` (an ``SDLoRAViT``): its pretrained cfg (size, interpolation) and ``data.normalize``.

    ``model.crop_pct`` (explicit or from the weights file) wins over ``data.eval_crop_pct``; timm's own default
    crop of ``model.name`` does not, so recipes keep their stated crop.
    """
    pcfg = model.pretrained_cfg
    mean, std = NORMALIZE_STATS[data.normalize](pcfg)
    overrides = getattr(model.backbone, "preprocessing_overrides", {})
    return TransformSpec(
        img_size=int(pcfg["input_size"][-1]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=str(pcfg.get("interpolation", "bicubic")),
        crop_pct=float(overrides.get("crop_pct", data.eval_crop_pct)),
        train_scale=(data.train_crop_scale[0], data.train_crop_scale[1]),
        hflip=data.hflip,
        train_interpolation=data.train_interpolation,
    )


def preprocessing_record(model: Any, data: DataConfig) -> dict[str, Any]:
    """What ``run.json`` stores: the resolved eval preprocessing and the weights actually loaded."""
    spec = transform_spec(model, data)
    return {
        "preprocessing": {
            "input_size": [3, spec.img_size, spec.img_size],
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
            "crop_pct": spec.crop_pct,
            "normalize": data.normalize,
        },
        "weights": dict(getattr(model.backbone, "loaded_weights", {}) or {}),
    }


def describe_weights(weights: dict[str, Any]) -> str:
    """One line: path, tensor count and sha256 prefix of the loaded weights (or how the backbone was initialised)."""
    if not weights.get("sha256"):
        return f"weights: {weights.get('path')} (no file loaded)"
    return f"weights: {weights['path']} ({weights['tensors']} tensors, sha256 {weights['sha256']})"


def describe_preprocessing(record: dict[str, Any]) -> str:
    """One line for the start of a run: the preprocessing every image goes through."""
    p = record["preprocessing"]
    mean = ", ".join(f"{v:.4g}" for v in p["mean"])
    std = ", ".join(f"{v:.4g}" for v in p["std"])
    return (
        f"preprocessing: {p['input_size'][1]}px {p['interpolation']}, crop_pct {p['crop_pct']:.4g}, "
        f"mean ({mean}), std ({std}) [data.normalize={p['normalize']}]"
    )


def preprocessing_origin(before: ModelConfig, after: ModelConfig, source: str | None, normalize: str) -> str:
    """One line: where each preprocessing value in force comes from (config, the weights file, timm's defaults)."""
    keys = ("mean", "std", "interpolation", "crop_pct")
    groups: dict[str, list[str]] = {}
    for key in keys:
        if getattr(before, key) is not None:
            origin = "the config"
        elif getattr(after, key) is not None:
            origin = str(source)
        else:
            origin = f"timm's defaults for {after.name}" if key != "crop_pct" else "data.eval_crop_pct"
        groups.setdefault(origin, []).append(key)
    parts = [f"{'/'.join(names)} from {origin}" for origin, names in groups.items()]
    if normalize != "model":  # the mean/std above are then not what the images are normalised with
        parts.append(f"but data.normalize={normalize} sets the mean/std images are normalised with")
    return "preprocessing sources: " + "; ".join(parts)
