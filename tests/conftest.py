"""Shared fixtures: seeded tiny ViTs (img 32, a few blocks), CPU only."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(2)

TINY_VIT = "{img_size: 32, patch_size: 8, depth: 3, embed_dim: 48, num_heads: 3}"


def tiny_overrides(*extra: str) -> list[str]:
    """Overrides for a seeded tiny random-init ViT (3 blocks, width 48, 17 tokens)."""
    return ["model.name=vit_tiny_patch16_224", "model.weights=random", f"model.kwargs={TINY_VIT}", *extra]


@pytest.fixture
def tiny_cfg():
    """A factory: ``tiny_cfg("adapter.preset=official", ...)`` -> validated Config."""
    from sdlora_dist.config import load_config

    def make(*extra: str):
        return load_config(overrides=tiny_overrides(*extra))

    return make
