"""Baseline for the adapter benchmark: the reference code's per-task loop (reference-sdlora.md section 1).

Written from that description only. For each adapted projection p in {q, v} of a block's fused qkv::

    delta_p = sum_{i<t} alpha_i * B_i,p(A_i,p(x)) / (||B_i,p||_F * ||A_i,p||_F)  +  alpha_t * B_t,p(A_t,p(x))

one past task at a time, accumulated, then the current task. The per-forward ``nn.Linear`` construction and the
disk I/O of the reference are deliberately not reproduced: only the loop, so the comparison isolates its cost.
One magnitude per task is shared by every block and both projections, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceLoopQKV(nn.Module):
    """The loop-per-task SD-LoRA layer on a fused qkv linear (``in=d``, ``out=3d``); k is not adapted.

    ``past_A[i]`` [2, r, d] and ``past_B[i]`` [2, d, r] are frozen (index 0 = q, 1 = v); ``cur_A``/``cur_B`` train.
    ``alphas`` is shared by reference with every other wrapper of the model: entries ``0..T-1`` are the past
    magnitudes, entry ``T`` the current one.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        past_A: list[torch.Tensor],
        past_B: list[torch.Tensor],
        cur_A: torch.Tensor,
        cur_B: torch.Tensor,
        alphas: nn.ParameterList,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.dim = base_layer.in_features
        self.past_A = nn.ParameterList([nn.Parameter(a.clone(), requires_grad=False) for a in past_A])
        self.past_B = nn.ParameterList([nn.Parameter(b.clone(), requires_grad=False) for b in past_B])
        self.cur_A = nn.Parameter(cur_A.clone())
        self.cur_B = nn.Parameter(cur_B.clone())
        self.__dict__["_alphas"] = alphas  # shared; registered once on the owning model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d] -> qkv [..., 3d], looping over past tasks as the reference does."""
        alphas: nn.ParameterList = self.__dict__["_alphas"]
        qkv = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        deltas = []
        for p in (0, 1):  # q, v
            delta = torch.zeros_like(qkv[..., : self.dim])
            for i in range(len(self.past_A)):
                a, b = self.past_A[i][p], self.past_B[i][p]
                norm = torch.norm(b) * torch.norm(a)  # product of separate Frobenius norms, no gradient
                delta = delta + alphas[i] * (F.linear(F.linear(x, a), b) / norm)
            a, b = self.cur_A[p], self.cur_B[p]
            delta = delta + alphas[len(self.past_A)] * F.linear(F.linear(x, a), b)
            deltas.append(delta)
        d = self.dim
        return torch.cat((qkv[..., :d] + deltas[0], qkv[..., d : 2 * d], qkv[..., 2 * d :] + deltas[1]), dim=-1)


def inject_reference_loop(
    backbone: nn.Module,
    past_pairs: list[list[tuple[torch.Tensor, torch.Tensor]]],
    cur_pairs: list[tuple[torch.Tensor, torch.Tensor]],
    alphas: nn.ParameterList,
) -> None:
    """Replace ``blocks.{j}.attn.qkv`` by :class:`ReferenceLoopQKV`.

    ``past_pairs[j]`` lists block j's frozen (A [2, r, d], B [2, d, r]) per past task; ``cur_pairs[j]`` is its
    trainable pair. ``alphas`` holds ``len(past_pairs[j]) + 1`` magnitudes, shared by all blocks.
    """
    for j, blk in enumerate(backbone.blocks):
        a_list = [a for a, _ in past_pairs[j]]
        b_list = [b for _, b in past_pairs[j]]
        blk.attn.qkv = ReferenceLoopQKV(blk.attn.qkv, a_list, b_list, cur_pairs[j][0], cur_pairs[j][1], alphas)
