"""After-task math as pure tensor functions: freeze a direction (by preset), rank schedule (RR), absorption (KD).

Nothing here touches files, ranks or modules: the model gathers factors into tensors, these functions decide, and
the model applies the :class:`Decision` (on every rank, after rank 0 decided and broadcast it).

Factor layout: for a task, ``B`` is [S, d, r] and ``A`` is [S, r, d], one entry per adapted matrix (slot ``2 j`` = q,
``2 j + 1`` = v of the j-th adapted block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from sdlora_dist.errors import UserError


@dataclass
class Decision:
    """What consolidation did to the task's pair, and the magnitudes to set afterwards (JSON-serialisable)."""

    task: str
    action: str  # "frozen" (kept as a new past direction), "absorbed" (KD: folded into past ones), "kept" (lora-seq)
    rank: int
    relative_residual: float | None = None
    coefficients: list[list[float]] = field(default_factory=list)  # [S or 1][T_past], KD fit
    magnitudes: dict[str, list[float]] = field(default_factory=dict)  # key -> new values (num_slots each)

    def to_dict(self) -> dict:
        """Plain dict for JSON and broadcasting."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Decision:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def rank_for_task(task: int, rank: int, schedule: list[list[int]] | None) -> int:
    """SD-LoRA-RR: the rank of task ``task`` (0-based) from ``[[first_task, rank], ...]``, else ``rank``."""
    if schedule is None:
        return rank
    if not schedule or schedule[0][0] != 0:
        raise UserError(f"adapter.rank_schedule: must start at task 0 (got {schedule!r})")
    chosen = schedule[0][1]
    for first_task, r in schedule:
        if task >= first_task:
            chosen = r
    return chosen


def pair_gram(
    b_left: torch.Tensor, a_left: torch.Tensor, b_right: torch.Tensor, a_right: torch.Tensor
) -> torch.Tensor:
    """``<B_k A_k, B_l A_l>_F`` per slot in low-rank form: ``sum((B_k^T B_l) * (A_k A_l^T))`` -> [S].

    No d x d matrix is formed: cost r_k r_l d per slot.
    """
    btb = b_left.transpose(-1, -2) @ b_right  # [S, r_k, r_l]
    aat = a_left @ a_right.transpose(-1, -2)  # [S, r_k, r_l]
    return (btb * aat).sum(dim=(-1, -2))


def fit_in_span(
    past: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    new_b: torch.Tensor,
    new_a: torch.Tensor,
    *,
    per_slot: bool,
) -> tuple[torch.Tensor, float]:
    """Least-squares fit of ``B_new A_new`` by the past unit directions ``D_i = B_i A_i / n_i``.

    ``past`` holds ``(B_i [S,d,r_i], A_i [S,r_i,d], n_i [S])``. With ``per_slot=False`` one coefficient per past task
    is shared by every slot (the magnitudes are shared, so the coefficients must be too), fitted jointly over all
    adapted matrices; with ``per_slot=True`` each slot has its own. Returns ``(coefficients [S or 1, T],
    relative residual ||X - sum c D|| / ||X||)`` computed in float64 from Gram matrices.
    """
    f64 = torch.float64
    nb, na = new_b.to(f64), new_a.to(f64)
    num_slots, t = nb.shape[0], len(past)
    inv = []
    for _, _, n in past:
        n = n.to(f64)
        inv.append(torch.where(n > 0, 1.0 / n.clamp_min(1e-300), torch.zeros_like(n)))
    gram = torch.zeros(num_slots, t, t, dtype=f64)
    rhs = torch.zeros(num_slots, t, dtype=f64)
    for i, (bi, ai, _) in enumerate(past):
        bi, ai = bi.to(f64), ai.to(f64)
        rhs[:, i] = pair_gram(bi, ai, nb, na) * inv[i]
        for j in range(i, t):
            g = pair_gram(bi, ai, past[j][0].to(f64), past[j][1].to(f64)) * inv[i] * inv[j]
            gram[:, i, j] = g
            gram[:, j, i] = g
    target_sq = pair_gram(nb, na, nb, na)  # [S]
    if not per_slot:
        gram, rhs, target_sq = gram.sum(0, keepdim=True), rhs.sum(0, keepdim=True), target_sq.sum(0, keepdim=True)
    coeffs = (torch.linalg.pinv(gram, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)  # [S', T]
    residual = target_sq - 2 * (coeffs * rhs).sum(-1) + torch.einsum("si,sij,sj->s", coeffs, gram, coeffs)
    total = target_sq.sum().item()
    relative = (residual.clamp_min(0).sum().item() / total) ** 0.5 if total > 0 else 0.0
    return coeffs, relative


def plan_freeze(
    key: str,
    alpha: torch.Tensor,
    norms: torch.Tensor,
    *,
    preset: str,
    rank: int,
) -> Decision:
    """Freeze the current pair as a past direction and choose its magnitude.

    ``paper``: the direction becomes ``B A / ||B A||_F`` and its magnitude ``alpha_t * ||B_p A_p||_F`` per slot, or,
    for one shared scalar, ``alpha_t * mean_p ||B_p A_p||_F`` -- the least-squares best shared scale (minimises
    ``sum_p (alpha_t n_p - s)^2``), so the function changes as little as a shared scalar allows, and not at all
    with per-layer magnitudes. ``official``: the magnitude is kept; the authors' code then resets every alpha to
    its init when the next task starts (sdlora.py:109), which :meth:`SDLoRAViT.add_task` does for that preset.
    """
    if preset == "official":
        return Decision(task=key, action="frozen", rank=rank, magnitudes={key: alpha.tolist()})
    scaled = alpha.to(torch.float64) * norms.to(torch.float64)  # [S] (alpha broadcast when shared)
    value = scaled if alpha.numel() == norms.numel() else scaled.mean().reshape(1)
    return Decision(task=key, action="frozen", rank=rank, magnitudes={key: value.tolist()})


def plan_absorption(
    key: str,
    alpha: torch.Tensor,
    past_keys: list[str],
    past_alphas: torch.Tensor,
    coeffs: torch.Tensor,
    relative_residual: float,
    *,
    rank: int,
) -> Decision:
    """KD: ``alpha_t B_t A_t ~= alpha_t sum_i c_i D_i`` so ``alpha_i += alpha_t c_i`` and the pair is dropped.

    ``alpha`` [num_slots], ``past_alphas`` [T, num_slots], ``coeffs`` [num_slots or 1, T].
    """
    new_alphas = past_alphas.to(torch.float64) + alpha.to(torch.float64)[None, :] * coeffs.t()  # [T, num_slots]
    return Decision(
        task=key,
        action="absorbed",
        rank=rank,
        relative_residual=relative_residual,
        coefficients=coeffs.tolist(),
        magnitudes={k: new_alphas[i].tolist() for i, k in enumerate(past_keys)},
    )
