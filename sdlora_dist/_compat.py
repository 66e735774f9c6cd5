"""Import-time compatibility fixes for the pinned stack.

The only torchvision release for ``torch==2.13.0`` is a CUDA build. On a CPU-only torch its compiled
extension cannot load, and torchvision's import then fails on ``torchvision::nms`` not existing, which
breaks ``import timm``. Defining the two op schemas it registers fake kernels for makes the pure-Python
parts (transforms, and everything timm needs) import; the compiled ops stay unavailable. On installs
where the extension loads, this does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_FRAGMENT: torch.library.Library | None = None


def _torchvision_ops_loaded() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup is the probe
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision's compiled library cannot load."""
    global _FRAGMENT
    if _FRAGMENT is not None or _torchvision_ops_loaded():
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for lib_path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(lib_path)
            return
        except OSError:
            pass  # CUDA build next to CPU torch: fall through to the schema-only fix
    _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
    _FRAGMENT.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _FRAGMENT.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
