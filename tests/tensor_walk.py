"""Every tensor an object keeps, found by walking ``vars()`` of modules and the containers inside them.

``Module.to()`` moves parameters and buffers only. A tensor kept anywhere else on a module (a dict cache, a list, a
plain attribute) stays on its old device and dtype; on a GPU that ends in a ``torch.cat`` of CPU and CUDA tensors
hours into a run. :func:`reachable_tensors` finds every such tensor so a test can assert they all followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def reachable_tensors(root: Any, name: str = "root") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor reachable from ``root``.

    Walks modules through ``vars(module)`` (so ``_parameters``, ``_buffers``, ``_modules`` and every plain attribute,
    including ones stashed in ``__dict__`` by hand), dataclass instances through their fields, and dicts, lists,
    tuples and sets through their items. Each object is visited once (modules may be shared, e.g. a magnitude bank).
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(name, root)]
    while stack:
        path, obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path, obj
        elif isinstance(obj, nn.Module):
            stack.extend((f"{path}.{k}", v) for k, v in vars(obj).items())
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            stack.extend((f"{path}.{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj))
        elif isinstance(obj, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))


def wrong_dtype(root: Any, dtype: torch.dtype) -> list[str]:
    """Paths of the floating-point tensors reachable from ``root`` whose dtype is not ``dtype`` (integer tensors,
    such as index maps, keep their dtype by design)."""
    return [f"{p}: {t.dtype}" for p, t in reachable_tensors(root) if t.is_floating_point() and t.dtype != dtype]


def wrong_device(root: Any, device: torch.device | str) -> list[str]:
    """Paths of the tensors reachable from ``root`` that are not on ``device``."""
    want = torch.device(device)
    return [f"{p}: {t.device}" for p, t in reachable_tensors(root) if t.device.type != want.type]
