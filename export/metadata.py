"""What an exported model carries about itself: the ONNX ``metadata_props`` written by export and read by serving.

Every key lives under the ``sdlora.`` prefix; values are strings (JSON for lists). A serving process needs nothing
but the ``.onnx`` file: class names, the preprocessing (mean/std, input size, interpolation, crop_pct) and the input
contract (``input_layout``: ``NCHW_float32`` normalised pixels, or ``NHWC_uint8`` raw pixels normalised in-graph).
``sdlora.lineage`` (JSON, ``export/lineage.py``) says where the model came from: run, task, data, parent, accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from sdlora_dist import __version__
from sdlora_dist.config import Interpolation
from sdlora_dist.errors import UserError

PREFIX = "sdlora."
LAYOUT_FLOAT = "NCHW_float32"
LAYOUT_UINT8 = "NHWC_uint8"
LAYOUTS = (LAYOUT_FLOAT, LAYOUT_UINT8)
PRECISIONS = ("fp32", "fp16")
INTERPOLATIONS = get_args(Interpolation)

# Keys the caller of ``export_onnx`` provides; the exporter adds version, layout and precision itself.
REQUIRED_KEYS = ("class_names", "mean", "std", "input_size", "interpolation", "crop_pct", "num_tasks", "config_hash")
# Keys a file may lack (added after the first release); they default to "".
_OPTIONAL = ("weights", "lineage")


@dataclass(frozen=True)
class ModelMetadata:
    """Self-description of an exported classifier (one instance per ``.onnx`` file)."""

    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]  # (C, H, W), timm's convention
    interpolation: str
    crop_pct: float
    num_tasks: int
    config_hash: str
    package_version: str = __version__
    input_layout: str = LAYOUT_FLOAT
    precision: str = "fp32"
    weights: str = ""  # the pre-trained weights the run loaded: path, tensor count, sha256 prefix (provenance)
    lineage: str = ""  # JSON: run, task, data and class split, parent, training-time accuracy (export/lineage.py)

    @property
    def num_classes(self) -> int:
        """Width of the logits."""
        return len(self.class_names)

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the network input."""
        return self.input_size[1], self.input_size[2]

    def replace(self, **changes: Any) -> ModelMetadata:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_props(self) -> dict[str, str]:
        """String key/values for ``ModelProto.metadata_props``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[PREFIX + f.name] = (
                value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
            )
        return out

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, source: str) -> ModelMetadata:
        """Parse ``metadata_props`` (onnxruntime's ``custom_metadata_map``); ``source`` names the file in errors."""
        missing = [f.name for f in dataclasses.fields(cls) if PREFIX + f.name not in props and f.name not in _OPTIONAL]
        if missing:
            raise UserError(
                f"{source} has no sdlora metadata ({', '.join(PREFIX + m for m in missing)} missing): "
                "it was not written by 'sdlora export'; export the model again with 'sdlora export OUT.onnx'"
            )
        raw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if PREFIX + f.name not in props:  # an optional field absent from a file of an older version
                continue
            text = props[PREFIX + f.name]
            if f.type in ("str", str):
                raw[f.name] = text
                continue
            try:
                raw[f.name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{source}: metadata {PREFIX}{f.name} is not valid JSON ({text[:60]!r})") from exc
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "metadata") -> ModelMetadata:
        """Validate a plain dict (the ``metadata=`` argument of ``export_onnx``); every problem is reported at once."""
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing keys {missing} (required: {', '.join(REQUIRED_KEYS)})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (valid: {', '.join(sorted(known))})")
        meta = cls(
            class_names=tuple(str(c) for c in raw["class_names"]),
            mean=tuple(float(v) for v in raw["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in raw["std"]),  # type: ignore[arg-type]
            input_size=tuple(int(v) for v in raw["input_size"]),  # type: ignore[arg-type]
            interpolation=str(raw["interpolation"]),
            crop_pct=float(raw["crop_pct"]),
            num_tasks=int(raw["num_tasks"]),
            config_hash=str(raw["config_hash"]),
            **{k: str(raw[k]) for k in ("package_version", "input_layout", "precision", *_OPTIONAL) if k in raw},
        )
        problems = meta.problems()
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return meta

    def problems(self) -> list[str]:
        """Every inconsistency, as ``field: problem (got value)``."""
        errors = []
        if not self.class_names:
            errors.append("class_names: must not be empty")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                errors.append(f"{key}: must be 3 finite numbers (got {value})")
        if any(v <= 0 for v in self.std):
            errors.append(f"std: must be > 0 (got {self.std})")
        if len(self.input_size) != 3 or self.input_size[0] != 3 or min(self.input_size) <= 0:
            errors.append(f"input_size: must be (3, H, W) with H, W > 0 (got {self.input_size})")
        if self.interpolation not in INTERPOLATIONS:
            errors.append(f"interpolation: must be one of {', '.join(INTERPOLATIONS)} (got {self.interpolation!r})")
        if not (0.0 < self.crop_pct <= 1.0):
            errors.append(f"crop_pct: must be in (0, 1] (got {self.crop_pct})")
        if self.num_tasks <= 0:
            errors.append(f"num_tasks: must be > 0 (got {self.num_tasks})")
        if self.input_layout not in LAYOUTS:
            errors.append(f"input_layout: must be one of {', '.join(LAYOUTS)} (got {self.input_layout!r})")
        if self.precision not in PRECISIONS:
            errors.append(f"precision: must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        return errors


def metadata_from_pretrained_cfg(
    pretrained_cfg: Mapping[str, Any],
    *,
    class_names: list[str],
    num_tasks: int,
    config_hash: str,
    crop_pct: float | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """The ``metadata=`` dict of ``export_onnx`` from timm's ``pretrained_cfg``; explicit values override it.

    Pass ``mean``/``std``/``crop_pct`` when training normalised differently from the backbone's defaults
    (``data.normalize``, ``data.eval_crop_pct``): the metadata must describe what the model was trained on.
    """
    return {
        "class_names": list(class_names),
        "mean": list(mean if mean is not None else pretrained_cfg.get("mean", (0.5, 0.5, 0.5))),
        "std": list(std if std is not None else pretrained_cfg.get("std", (0.5, 0.5, 0.5))),
        "input_size": list(pretrained_cfg["input_size"]),
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        "crop_pct": float(crop_pct if crop_pct is not None else pretrained_cfg.get("crop_pct", 0.875)),
        "num_tasks": int(num_tasks),
        "config_hash": config_hash,
    }


def read_props(path: str | Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` without building an onnxruntime session (no graph optimisation); a missing
    or unreadable file is a UserError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: pass a file written by 'sdlora export'")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (onnx raises DecodeError and others on a file that is not ONNX)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a loadable ONNX model ({first_line[:200]}); export it again") from exc
    return {p.key: p.value for p in proto.metadata_props}


def read_metadata(path: str | Path) -> ModelMetadata:
    """The sdlora metadata of an exported file (UserError naming the file when it has none)."""
    return ModelMetadata.from_props(read_props(path), source=str(path))
