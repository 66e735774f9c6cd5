"""The SD-LoRA layer: a wrapper around a ViT block's fused ``qkv`` linear (math only: no I/O, no distributed).

Per adapted projection p in {q, v} of one block (paper Sec. 3, Fig. 1; reference-sdlora.md section 1)::

    W'_p = W0_p + sum_{i in past} alpha_i * D_i,p  +  alpha_t * B_t,p A_t,p        D_i,p = B_i,p A_i,p / n_i,p

``n_i,p`` is ``||B A||_F`` (preset ``paper``) or ``||B||_F ||A||_F`` (preset ``official``). The current pair is not
normalised: B starts at zero, so it has no direction yet.

Cost per step does not grow with the number of past tasks: the frozen factors of all past tasks live in one
concatenated bank per adapter (non-persistent buffers, rebuilt after consolidation or load) and the per-column
scales ``alpha_task(c) / n_c`` in a vector. Two kernels (``compute``):

* ``dense``: ``dW = B_past diag(s) A_past + alpha_t B_t A_t`` once per step (no tokens in it), then one matmul with
  ``W0 + dW``. Activations saved: the input, as plain LoRA. Gradients reach the alphas and the current pair through
  ``dW``; autograd never differentiates the frozen bank.
* ``lowrank``: ``x -> A -> scale -> B`` for the past bank and for the current pair; the alphas' gradient needs the
  ``N x R`` bank projections saved, so activations and time grow with the task count (measured in
  ``bench/bench_adapters.py``: 1.16x plain LoRA at T=20 on ViT-S). Only worth it when tokens per step are fewer
  than the layer width, which ViT training does not reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Q, V = 0, 1  # index of the q and v projection in the stacked [2, ...] factor tensors


class MagnitudeBank(nn.Module):
    """The magnitudes (alphas): one trainable vector of ``num_slots`` per task, keyed ``task_XX``.

    ``num_slots`` is 1 when a task's magnitude is shared by every adapted matrix (the default, as in the authors'
    code) or ``2 * n_adapted_blocks`` for per-layer magnitudes (slot ``2 j`` is q and ``2 j + 1`` is v of the j-th
    adapted block).
    """

    def __init__(self, num_slots: int) -> None:
        super().__init__()
        self.num_slots = num_slots
        self.values = nn.ParameterDict()
        # Empty, never saved: it follows ``.to()``, so a magnitude added after a move gets the new device and dtype.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def add(self, key: str, value: float, *, trainable: bool = True) -> None:
        """Create the magnitude of a new task, filled with ``value``."""
        if key in self.values:
            raise RuntimeError(f"magnitude {key} already exists")
        value_t = self.anchor.new_full((self.num_slots,), float(value))
        self.values[key] = nn.Parameter(value_t, trainable)

    def stacked(self, keys: list[str]) -> torch.Tensor:
        """Magnitudes of ``keys`` as a [len(keys), num_slots] tensor (autograd flows to each task's parameter)."""
        return torch.stack([self.values[k] for k in keys])

    def slot_pair(self, values: torch.Tensor, block_slot: int) -> torch.Tensor:
        """Select the (q, v) slots of one adapted block from [..., num_slots] -> [..., 2]."""
        if self.num_slots == 1:
            return values.expand(*values.shape[:-1], 2)
        return values[..., 2 * block_slot : 2 * block_slot + 2]


class SDLoRAQKV(nn.Module):
    """SD-LoRA on the q and v slices of a fused ``qkv`` linear (``in=d``, ``out=3d``); k is not adapted.

    Factors are stored per task under names (``lora_A["task_03"]`` of shape [2, r, d] and ``lora_B["task_03"]`` of
    shape [2, d, r], index 0 = q, 1 = v), so ``state_dict()`` is the checkpoint. Which task is current and which are
    frozen is set by the owning model through :meth:`set_layout`; the magnitudes live in a :class:`MagnitudeBank`
    shared by all adapters of the model (held here by reference, registered once on the model).
    """

    def __init__(self, base_layer: nn.Linear, bank: MagnitudeBank, block_slot: int, *, preset: str, compute: str):
        super().__init__()
        if base_layer.out_features != 3 * base_layer.in_features:
            raise ValueError(
                f"SD-LoRA wraps a fused qkv linear with out = 3 * in; got in={base_layer.in_features}, "
                f"out={base_layer.out_features}"
            )
        self.base_layer = base_layer
        self.dim = base_layer.in_features
        self.block_slot = block_slot
        self.preset = preset
        self.compute = compute
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.__dict__["_bank"] = bank  # not a submodule: the model registers the bank once
        self.frozen_keys: list[str] = []
        self.current_key: str | None = None
        # Derived state (rebuilt by set_layout), all non-persistent buffers so that ``.to()`` moves them: 1/n per
        # frozen task (computed once per key: frozen factors never change; rows named by _norm_keys) and the
        # concatenated bank of past factors.
        self._norm_keys: list[str] = []
        self.register_buffer("frozen_inv_norm", torch.empty(0, 2), persistent=False)  # [T_past, 2]: q, v
        self.register_buffer("past_A", torch.empty(0), persistent=False)  # [2, R, d]
        self.register_buffer("past_B", torch.empty(0), persistent=False)  # [2, d, R]
        self.register_buffer("past_inv_norm", torch.empty(0), persistent=False)  # [2, R]
        self.register_buffer("past_col_task", torch.empty(0, dtype=torch.long), persistent=False)  # [R]
        # Loading weights overwrites the frozen factors the bank and the cached norms derive from: rebuild them then,
        # so no caller has to remember to (a stale bank would silently give wrong outputs). Only the norms of the
        # pairs the load overwrote are recomputed: a mid-task engine load inside a bf16 engine brings the trained
        # pair only, and the frozen pairs' float32 norms must survive it (else a resumed run is not the same run).
        self.register_load_state_dict_pre_hook(_note_loaded_pairs)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    # ---------------------------------------------------------------------------------------------------------------
    # Lifecycle (driven by the model)

    def add_pair(self, key: str, rank: int) -> None:
        """Create task ``key``'s trainable pair: A kaiming-uniform(a=sqrt 5), B zeros (reference section 2)."""
        if key in self.lora_A:
            raise RuntimeError(f"adapter pair {key} already exists")
        w = self.base_layer.weight
        a = torch.empty(2, rank, self.dim, device=w.device, dtype=w.dtype)
        for p in (Q, V):
            nn.init.kaiming_uniform_(a[p], a=5**0.5)
        self.lora_A[key] = nn.Parameter(a)
        self.lora_B[key] = nn.Parameter(torch.zeros(2, self.dim, rank, device=w.device, dtype=w.dtype))

    def drop_pair(self, key: str) -> None:
        """Remove task ``key``'s pair (KD absorbed it into the past directions)."""
        del self.lora_A[key]
        del self.lora_B[key]
        self.forget_norms({key})

    def forget_norms(self, keys: set[str] | None = None) -> None:
        """Drop cached normalisers of ``keys`` (all by default) after their factors were overwritten or removed."""
        keep = [i for i, k in enumerate(self._norm_keys) if keys is not None and k not in keys]
        self.frozen_inv_norm = self.frozen_inv_norm[keep]
        self._norm_keys = [self._norm_keys[i] for i in keep]

    def rebuild_derived_state(self) -> None:
        """Recompute the cached normalisers and the past bank from the current factors (same layout)."""
        self.forget_norms()
        self.set_layout(self.frozen_keys, self.current_key)

    def _inv_norms(self, keys: list[str]) -> torch.Tensor:
        """``1 / n`` of frozen pairs for q and v -> [len(keys), 2] (0 for an all-zero pair); cached rows are reused."""
        cached = dict(zip(self._norm_keys, self.frozen_inv_norm, strict=True))
        rows = []
        for key in keys:
            if key not in cached:
                norm = self.pair_norms(key)
                tiny = torch.finfo(norm.dtype).tiny
                cached[key] = torch.where(norm > 0, 1.0 / norm.clamp_min(tiny), torch.zeros_like(norm))
            rows.append(cached[key])
        return torch.stack(rows)

    def pair_norms(self, key: str) -> torch.Tensor:
        """Normaliser ``n_p`` of task ``key``'s pair for q and v -> [2], by the preset's rule."""
        a, b = self.lora_A[key].detach(), self.lora_B[key].detach()
        if self.preset == "official":  # product of separate Frobenius norms (lora.py:183-188)
            return b.flatten(1).norm(dim=1) * a.flatten(1).norm(dim=1)
        return product_frobenius_norm(b, a)

    @torch.no_grad()
    def set_layout(self, frozen_keys: list[str], current_key: str | None) -> None:
        """Declare which pairs are frozen past directions and which one trains; rebuild the past bank."""
        self.frozen_keys = list(frozen_keys)
        self.current_key = current_key
        for key in self.lora_A:
            trainable = key == current_key
            self.lora_A[key].requires_grad_(trainable)
            self.lora_B[key].requires_grad_(trainable)
        w = self.base_layer.weight
        if not frozen_keys:
            self.forget_norms()
            self.past_A = w.new_empty(2, 0, self.dim)
            self.past_B = w.new_empty(2, self.dim, 0)
            self.past_inv_norm = w.new_empty(2, 0)
            self.past_col_task = torch.empty(0, dtype=torch.long, device=w.device)
            return
        self.past_A = torch.cat([self.lora_A[k].detach() for k in frozen_keys], dim=1).contiguous()
        self.past_B = torch.cat([self.lora_B[k].detach() for k in frozen_keys], dim=2).contiguous()
        self.frozen_inv_norm = self._inv_norms(frozen_keys).contiguous()  # [T_past, 2]
        self._norm_keys = list(frozen_keys)
        inv = [
            n[:, None].expand(2, self.lora_A[k].shape[1])
            for n, k in zip(self.frozen_inv_norm, frozen_keys, strict=True)
        ]
        self.past_inv_norm = torch.cat(inv, dim=1).contiguous()
        self.past_col_task = torch.cat(
            [torch.full((self.lora_A[k].shape[1],), i, dtype=torch.long) for i, k in enumerate(frozen_keys)]
        ).to(w.device)

    # ---------------------------------------------------------------------------------------------------------------
    # Math

    def _past_scales(self) -> torch.Tensor:
        """Per-column scale ``alpha_task(c) / n_c`` of the past bank -> [2, R]."""
        bank: MagnitudeBank = self.__dict__["_bank"]
        alphas = bank.slot_pair(bank.stacked(self.frozen_keys), self.block_slot)  # [T_past, 2]
        return alphas[self.past_col_task].t() * self.past_inv_norm  # [2, R]

    def _current_alpha(self) -> torch.Tensor:
        bank: MagnitudeBank = self.__dict__["_bank"]
        return bank.slot_pair(bank.values[self.current_key], self.block_slot)  # [2]

    def delta_weight(self) -> torch.Tensor | None:
        """``dW`` for q and v -> [2, d, d] in the base weight's dtype (None when nothing is adapted yet)."""
        delta = None
        dtype = self.base_layer.weight.dtype
        if self.frozen_keys:
            # The bank is a buffer built in the model's dtype (fp32 outside a bf16 engine, which casts parameters
            # only): compute in the parameters' dtype, as the base layer does.
            scaled_a = self.past_A.to(dtype) * self._past_scales()[:, :, None].to(dtype)  # [2, R, d]
            delta = torch.bmm(self.past_B.to(dtype), scaled_a)  # [2, d, d]
        if self.current_key is not None:
            alpha = self._current_alpha().to(dtype)
            current = torch.bmm(self.lora_B[self.current_key], self.lora_A[self.current_key]) * alpha[:, None, None]
            delta = current if delta is None else delta + current
        return delta

    def _pad_qv(self, delta: torch.Tensor) -> torch.Tensor:
        """[2, d, d] q/v deltas -> [3d, d] with zeros on the k rows."""
        zeros = delta.new_zeros(self.dim, self.dim)
        return torch.cat((delta[Q], zeros, delta[V]), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d] -> qkv [..., 3d]."""
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.compute == "lowrank":
            return self._forward_lowrank(x)
        delta = self.delta_weight()
        if delta is None:
            return F.linear(x, w, b)
        d = self.dim
        merged = torch.cat((w[:d] + delta[Q], w[d : 2 * d], w[2 * d :] + delta[V]), dim=0)  # [3d, d]
        return F.linear(x, merged, b)

    def _forward_lowrank(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        delta = None
        if self.frozen_keys:  # own matmuls: autograd never forms gradients for the frozen bank
            u = torch.einsum("...d,prd->...pr", x, self.past_A.to(x.dtype)) * self._past_scales().to(x.dtype)
            delta = torch.einsum("...pr,pdr->...pd", u, self.past_B.to(x.dtype))  # u [..., 2, R] -> [..., 2, d]
        if self.current_key is not None:
            a_cur, b_cur = self.lora_A[self.current_key], self.lora_B[self.current_key]
            u = torch.einsum("...d,prd->...pr", x, a_cur)  # [..., 2, r]
            current = torch.einsum("...pr,pdr->...pd", u, b_cur) * self._current_alpha().to(x.dtype)[:, None]
            delta = current if delta is None else delta + current
        if delta is None:
            return out
        d = self.dim
        return torch.cat(
            (out[..., :d] + delta[..., Q, :], out[..., d : 2 * d], out[..., 2 * d :] + delta[..., V, :]), -1
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W0 + dW`` as a plain [3d, d] weight (for merge/export)."""
        delta = self.delta_weight()
        w = self.base_layer.weight
        return w.clone() if delta is None else w + self._pad_qv(delta).to(w.dtype)


def _note_loaded_pairs(module: SDLoRAQKV, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """``load_state_dict`` pre-hook: remember which pairs' factors this load overwrites (``lora_A.task_03``...)."""
    names = (k[len(prefix) :].split(".") for k in state_dict if k.startswith(prefix))
    module.__dict__["_loaded_pairs"] = {n[1] for n in names if len(n) == 2 and n[0] in ("lora_A", "lora_B")}


def _rebuild_after_load(module: SDLoRAQKV, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: the loaded factors may have changed, so the derived state must follow."""
    module.forget_norms(module.__dict__.pop("_loaded_pairs", None))
    module.set_layout(module.frozen_keys, module.current_key)


def product_frobenius_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||B A||_F`` per leading index without forming B A: ``sqrt(sum((B^T B) * (A A^T)))``.

    ``b`` [..., d, r], ``a`` [..., r, d] -> [...]. Cost r^2 d, independent of d^2.
    """
    btb = b.transpose(-1, -2) @ b  # [..., r, r]
    aat = a @ a.transpose(-1, -2)  # [..., r, r]
    return (btb * aat).sum(dim=(-1, -2)).clamp_min(0).sqrt()
