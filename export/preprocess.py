"""Serving-side preprocessing with PIL + numpy (no torchvision), read from the model's metadata.

Same steps as timm's eval transform: resize and center crop by the training pipeline's own geometry
(``data.transforms.resize_center_crop``), then scale to [0, 1] and normalise with mean/std. The first two steps give
uint8 HWC crops (what a ``--with-preprocessing`` model takes); ``normalize`` does the last two in numpy with exactly
the arithmetic of the in-graph module ``InGraphNormalize``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdlora_dist.data.images import ImageDecodeError, open_rgb
from sdlora_dist.data.transforms import resize_center_crop
from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import ModelMetadata


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a missing, unreadable or non-image file raises UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return open_rgb(path)
    except (ImageDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc


def image_to_uint8(path: str | Path, meta: ModelMetadata) -> np.ndarray:
    """File -> uint8 (H, W, 3) crop at the model's input size."""
    crop = resize_center_crop(load_rgb(path), meta.image_hw, meta.crop_pct, meta.interpolation)
    return np.asarray(crop, dtype=np.uint8)


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
