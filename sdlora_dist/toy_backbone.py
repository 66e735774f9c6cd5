"""A toy "pre-trained" backbone for the offline demo: a tiny ViT trained on procedurally drawn glyphs.

SD-LoRA assumes a pre-trained ViT; nothing can be downloaded on an offline machine, and a randomly initialised ViT
gives features that a frozen backbone cannot recover from (class-incremental accuracy collapses). So the demo first
trains its tiny ViT on a synthetic task -- 64 classes of random stroke glyphs (lines, arcs, polylines) drawn with
PIL and jittered -- and saves it as a local weights file, which the digits run then loads through
``model.weights`` exactly like a real ViT-B/16 checkpoint. The glyphs share no data with the digits.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sdlora_dist.config import ModelConfig
from sdlora_dist.fileio import atomic_path

_CANVAS = 64  # glyphs are drawn large, then reduced to 8x8 like the digits, then resized to the model's input


def _glyph_prototypes(classes: int, rng: random.Random) -> list[list[tuple]]:
    """Each class: 1-3 strokes, each a kind, 2-4 control points in [0.15, 0.85]^2, and an arc's start/span."""
    protos = []
    for _ in range(classes):
        strokes = []
        for _ in range(rng.randint(1, 3)):
            points = [(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)) for _ in range(rng.randint(2, 4))]
            strokes.append((rng.choice(("line", "arc", "poly")), points, rng.uniform(0, 360), rng.uniform(90, 300)))
        protos.append(strokes)
    return protos


def _render(strokes: list[tuple], rng: random.Random, size: int) -> np.ndarray:
    """One jittered drawing of a prototype -> uint8 [size, size]."""
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    dx, dy, scale, width = (
        rng.uniform(-0.08, 0.08),
        rng.uniform(-0.08, 0.08),
        rng.uniform(0.8, 1.15),
        rng.randint(4, 8),
    )

    def place(x: float, y: float) -> tuple[float, float]:
        x, y = x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04)
        return ((0.5 + (x - 0.5) * scale + dx) * _CANVAS, (0.5 + (y - 0.5) * scale + dy) * _CANVAS)

    for kind, points, start, span in strokes:
        pts = [place(x, y) for x, y in points]
        if kind == "arc":
            (x0, y0), (x1, y1) = pts[0], pts[1]
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 8, max(y0, y1) + 8]
            draw.arc(box, start, start + span, fill=255, width=width)
        else:
            draw.line(pts, fill=255, width=width, joint="curve")
    small = img.resize((8, 8), Image.BILINEAR).resize((size, size), Image.BICUBIC)
    return np.asarray(small, dtype=np.uint8)


def glyph_dataset(classes: int, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, size, size] normalised to [-1, 1] and labels [N]."""
    rng = random.Random(seed)
    protos = _glyph_prototypes(classes, rng)
    images = np.stack([_render(p, rng, size) for p in protos for _ in range(per_class)])
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = torch.from_numpy(images).float().div_(127.5).sub_(1.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, labels


def pretrain_toy_backbone(
    model_cfg: ModelConfig,
    out: str | Path,
    *,
    steps: int = 400,
    classes: int = 64,
    per_class: int = 60,
    batch_size: int = 128,
    seed: int = 7,
) -> Path:
    """Train ``model_cfg``'s ViT (all weights) on glyphs and save the backbone (no head) as safetensors."""
    import timm
    from safetensors.torch import save_file

    from sdlora_dist.logs import progress_bar

    torch.manual_seed(seed)
    size = int(model_cfg.kwargs.get("img_size", 224))
    x, y = glyph_dataset(classes, per_class, size, seed)
    model = timm.create_model(model_cfg.name, pretrained=False, num_classes=classes, **model_cfg.kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(steps), desc="toy backbone on glyphs", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar.n % 10 == 0:  # .item() syncs; the bar redraws on its own interval
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.reset_classifier(0)
    out = Path(out)
    with atomic_path(out) as tmp:  # a killed demo never leaves a half-written weights file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return out
