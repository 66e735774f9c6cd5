"""Tiny-model training helpers shared by the core and checkpoint tests (deterministic SGD on random data)."""

from __future__ import annotations

import torch
from torch import nn

from sdlora_dist.model import SDLoRAViT, masked_cross_entropy

X = torch.Generator().manual_seed(0)
INPUTS: torch.Tensor = torch.randn(6, 3, 32, 32, generator=X)
LABELS_PER_TASK = 4


def train_task(model: SDLoRAViT, task: int, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps with the masked CE on random data for ``task`` (deterministic)."""
    g = torch.Generator().manual_seed(100 + task)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9)
    offset = model.class_offset(task)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = offset + torch.randint(0, LABELS_PER_TASK, (8,), generator=g)
        loss = masked_cross_entropy(model(x), y, offset, LABELS_PER_TASK)
        opt.zero_grad()
        loss.backward()
        opt.step()


def set_current_in_span(model: SDLoRAViT, coeffs: dict[str, float]) -> None:
    """Make the open pair's B A equal sum_k c_k D_k in every adapted matrix, D_k = B_k A_k / n_k (the past unit
    directions), so it lies exactly in their span with coefficients shared by all matrices."""
    key = model.current_key
    with torch.no_grad():
        for wrapper in model.adapters:
            a = torch.cat([wrapper.lora_A[k] for k in coeffs], dim=1)
            b = torch.cat(
                [wrapper.lora_B[k] * (c / wrapper.pair_norms(k))[:, None, None] for k, c in coeffs.items()], 2
            )
            wrapper.lora_A[key] = nn.Parameter(a.clone())
            wrapper.lora_B[key] = nn.Parameter(b.clone())
        model._sync_layout()
