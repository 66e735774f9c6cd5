"""Serving-side preprocessing with PIL + numpy (no torch, no torchvision), read from the model's metadata.

Same steps as timm's eval transform: resize by ``1 / crop_pct`` with the model's interpolation (the shorter side for
a square input, both sides otherwise), center crop to the input size, scale to [0, 1], normalise with mean/std.
The first two steps give uint8 HWC crops (what a ``--with-preprocessing`` model takes); ``normalize`` does the last
two with exactly the arithmetic of the in-graph module ``InGraphNormalize``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdlora_dist.data.images import ImageDecodeError, open_rgb
from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import ModelMetadata

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def pil_filter(name: str) -> Image.Resampling:
    """PIL resampling filter for a timm interpolation name; unknown names fail with the valid list."""
    if name not in _PIL_FILTERS:
        raise UserError(f"unknown interpolation {name!r}: valid are {', '.join(_PIL_FILTERS)}")
    return _PIL_FILTERS[name]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a missing, unreadable or non-image file raises UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return open_rgb(path)
    except (ImageDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc


def resize_center_crop(img: Image.Image, size_hw: tuple[int, int], crop_pct: float, interpolation: str) -> np.ndarray:
    """Resize by ``1 / crop_pct`` then center-crop to ``size_hw``; returns uint8 (H, W, 3)."""
    h, w = size_hw
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if h == w:
        # Shorter side to scale_h, aspect kept (timm: Resize(int) when the scale size is square).
        short, long_ = (img.width, img.height) if img.width <= img.height else (img.height, img.width)
        new_long = int(scale_h * long_ / short)
        new_size = (scale_h, new_long) if img.width <= img.height else (new_long, scale_h)
    else:
        new_size = (scale_w, scale_h)
    if new_size != img.size:
        img = img.resize(new_size, resample=pil_filter(interpolation))
    top = int(round((img.height - h) / 2.0))
    left = int(round((img.width - w) / 2.0))
    crop = img.crop((left, top, left + w, top + h))
    return np.asarray(crop, dtype=np.uint8)


def image_to_uint8(path: str | Path, meta: ModelMetadata) -> np.ndarray:
    """File -> uint8 (H, W, 3) crop at the model's input size."""
    return resize_center_crop(load_rgb(path), meta.image_hw, meta.crop_pct, meta.interpolation)


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): ``(x / 255 - mean) / std``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)  # (N, 3, H, W)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - m) / s


class InGraphNormalize(nn.Module):
    """uint8 NHWC images in, the wrapped classifier's logits out: ``normalize`` inside the ONNX graph."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (N, H, W, 3) uint8 -> (N, 3, H, W) float
        return self.model((x - self.mean) / self.std)
