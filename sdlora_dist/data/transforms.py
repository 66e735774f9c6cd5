"""Image transforms, one implementation for training, evaluation and serving (``export/preprocess.py``).

timm's geometry on PIL images: the train crop is RandomResizedCrop + horizontal flip, driven by a per-sample RNG
(``sample_rng``) so augmentation does not depend on worker scheduling; the eval crop resizes by ``1 / crop_pct`` and
center-crops. Crops are kept as uint8 and normalised once per batch (``normalize_batch``).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdlora_dist.errors import UserError

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def pil_filter(name: str) -> Image.Resampling:
    """PIL resampling filter for a timm interpolation name; unknown names fail with the valid list."""
    if name not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {name!r}: valid are {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


@dataclass
class TransformSpec:
    """Preprocessing from the model's pretrained config (the caller fills it; 'normalize: none' = mean 0, std 1)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    train_scale: tuple[float, float] = (0.05, 1.0)
    hflip: float = 0.5
    train_interpolation: str | None = None  # the train crop's resize; None = ``interpolation``

    def resample(self, train: bool = False) -> Image.Resampling:
        """PIL resampling filter for ``interpolation`` (``train_interpolation`` for the train crop when set)."""
        return pil_filter(self.train_interpolation if train and self.train_interpolation else self.interpolation)


def sample_rng(*parts: object) -> random.Random:
    """A private RNG seeded by a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm: 10 tries, ratio 3/4..4/3, else a clamped center crop)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W); batches are stacked in uint8 and normalised once."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # HWC -> CHW


def normalize_batch(x: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std``, as one fused multiply-add over the batch."""
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))


def train_crop(img: Image.Image, spec: TransformSpec, rng: random.Random) -> Image.Image:
    """RandomResizedCrop(img_size, scale) + horizontal flip, as one PIL resize of the crop box."""
    box = crop_box(img.width, img.height, spec.train_scale, rng)
    out = img.resize((spec.img_size, spec.img_size), spec.resample(train=True), box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < spec.hflip else out


def resize_center_crop(img: Image.Image, size_hw: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    """timm eval geometry: resize by ``1 / crop_pct`` (the shorter side for a square size, aspect kept; both sides
    otherwise), then center-crop to ``size_hw``."""
    h, w = size_hw
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if h == w:  # timm: Resize(int) when the scale size is square
        short, long_ = (img.width, img.height) if img.width <= img.height else (img.height, img.width)
        new_long = int(scale_h * long_ / short)
        new_size = (scale_h, new_long) if img.width <= img.height else (new_long, scale_h)
    else:
        new_size = (scale_w, scale_h)
    if new_size != img.size:
        img = img.resize(new_size, resample=pil_filter(interpolation))
    top = int(round((img.height - h) / 2.0))
    left = int(round((img.width - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def eval_crop(img: Image.Image, spec: TransformSpec) -> Image.Image:
    """``resize_center_crop`` to the square ``spec.img_size`` with the spec's crop and interpolation."""
    return resize_center_crop(img, (spec.img_size, spec.img_size), spec.crop_pct, spec.interpolation)
