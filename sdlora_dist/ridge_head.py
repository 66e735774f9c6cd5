"""Analytic ridge head (``train.head: ridge``, RanPAC-style; the default since issue 21, the paper recipes set
``linear``). Not part of SD-LoRA: it beat the paper's head on every benchmark and seed measured (BENCHMARKS.md).

Training is unchanged: every task trains its adapters and its linear head rows with the masked cross-entropy. The
classifier used for evaluation, export and prediction is then replaced by a closed-form one:

1. a fixed random projection ``P`` [d, M] (``M = train.ridge_dim``, entries N(0, 1) from a generator seeded by
   ``train.seed``; the same for every task) and a ReLU: ``h = relu(f @ P)``;
2. float64 sums over every seen class's train samples: per class the count and ``sum h`` [C, M] (the ridge targets
   are one-hot, so ``H^T Y`` is these class sums) and the Gram matrix ``G = sum h h^T`` [M, M]. One pass over the
   current task's train samples (eval transform) adds its sums, all-reduced over ranks; earlier tasks' sums come
   from task t-1's folder (cumulative: ``head_stats.safetensors`` of task t holds the sums of tasks 0..t), read by
   rank 0 and broadcast (other nodes may not see rank 0's run directory);
3. rank 0 solves ``W = (G + lam I)^-1 H^T Y`` with ``lam = train.ridge_lambda * trace(G) / M`` (scale-free) and
   broadcasts ``W``; the logits are ``h @ W``.

Drift (``train.drift``): the stored sums were measured under earlier models. ``linear`` fits drift.py's affine map
in the projected space (``h_old -> h_new`` on the current task's samples before and after the task) and applies it
to the sums exactly (``A G A^T + A s b^T + b s^T A^T + n b b^T``); ``sdc`` translates each class's points by its
distance-weighted shift in the projected space. A map of the *d*-dimensional features cannot be used: the ReLU makes
``G`` a non-linear function of them.

The exported graph stays one backbone forward, then ``Linear(d, M, bias=False)`` (P), ReLU, ``Linear(M, C)`` (W).
Stored per task (cumulative), C = seen classes: ``ridge_count`` [C] f64, ``ridge_sums`` [C, M] f64, ``ridge_gram``
[M, M] f64, ``ridge_projection`` [d, M] f32, ``ridge_weight`` [C, M] f32 (the solved head, so a loaded model
predicts exactly what was evaluated).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlora_dist import checkpoint as ckpt
from sdlora_dist import drift
from sdlora_dist.config import Config
from sdlora_dist.errors import UserError
from sdlora_dist.jobs import distributed as dist
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.logs import log_all_ranks, log_rank_zero
from sdlora_dist.model import RidgeHead

KEYS = ("ridge_count", "ridge_sums", "ridge_gram", "ridge_projection", "ridge_weight")


# ---------------------------------------------------------------------------------------------------------------------
# Math (pure tensor functions)


def random_projection(dim: int, width: int, seed: int) -> torch.Tensor:
    """The fixed projection [dim, width] (float32), a function of ``seed`` only (private generator)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, width, generator=generator, dtype=torch.float32)


def project(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``relu(f @ P)`` in float64: [B, d] -> [B, M]."""
    return F.relu(features.double() @ projection.double())


def ridge_sums(hidden: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Float64 sums of one batch of projected features: ``count`` [n], ``sums`` [n, M], ``gram`` [M, M]."""
    h = hidden.double()
    y = labels.to(torch.int64)
    return {
        "count": torch.bincount(y, minlength=num_classes).double(),
        "sums": torch.zeros(num_classes, h.shape[1], dtype=torch.float64).index_add_(0, y, h),
        "gram": h.T @ h,
    }


def solve(gram: torch.Tensor, sums: torch.Tensor, lam_rel: float) -> torch.Tensor:
    """Ridge weights [C, M] (float64): ``(G + lam I)^-1 H^T Y`` with ``lam = lam_rel * trace(G) / M``."""
    m = gram.shape[0]
    lam = lam_rel * float(torch.diagonal(gram).sum()) / m
    lam = lam if lam > 0 else lam_rel  # all-zero features: any positive lam gives W = 0
    return torch.linalg.solve(gram.double() + lam * torch.eye(m, dtype=torch.float64), sums.double().T).T


def checksum(head: RidgeHead) -> str:
    """sha256 of the projection and weights (ranks must agree)."""
    data = head.projection.cpu().numpy().tobytes() + head.weight.cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Statistics over tasks


def projected(pairs: drift.FeaturePairs, projection: torch.Tensor) -> drift.FeaturePairs:
    """``pairs`` in the projected space ``relu(f @ P)``, computed once for the sums, the drift map and SDC."""
    return drift.FeaturePairs(keys=pairs.keys, labels=pairs.labels, old=[project(f, projection) for f in pairs.old],
                              new=[project(f, projection) for f in pairs.new])  # fmt: skip


def task_sums(
    hidden: drift.FeaturePairs, m: int, num_classes: int, offset: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """This task's ridge sums from its projected features after training (``hidden.new``, width ``m``: a rank
    without samples still contributes zeros of the right shape), all-reduced over ranks."""
    total = {
        "count": torch.zeros(num_classes, dtype=torch.float64),
        "sums": torch.zeros(num_classes, m, dtype=torch.float64),
        "gram": torch.zeros(m, m, dtype=torch.float64),
    }
    for feats, labels in zip(hidden.new, hidden.labels, strict=True):
        for key, value in ridge_sums(feats, labels - offset, num_classes).items():
            total[key] += value
    return {k: dist.all_reduce_sum(v.to(device)).cpu() for k, v in total.items()}


def previous_sums(cfg: Config, task: int, device: torch.device | str) -> dict[str, torch.Tensor] | None:
    """Task ``task - 1``'s cumulative ridge sums (None for task 0), read by rank 0 and broadcast."""
    if task == 0:
        return None
    return dist.tensors_from_rank_zero(lambda: _read_previous(cfg, task), device)


def _read_previous(cfg: Config, task: int) -> dict[str, torch.Tensor]:
    stats = ckpt.load_head_stats(Path(cfg.run_dir), task - 1)
    if stats is None or any(k not in stats for k in KEYS):
        raise UserError(
            f"task {task - 1} of {cfg.run_dir} has no ridge head statistics ({ckpt.HEAD_STATS_FILE}): it was trained "
            "with another train.head; keep the run's settings or start a fresh run"
        )
    if stats["ridge_projection"].shape[1] != cfg.train.ridge_dim:
        raise UserError(
            f"{cfg.run_dir} was trained with train.ridge_dim={stats['ridge_projection'].shape[1]} "
            f"(got {cfg.train.ridge_dim}); keep the run's settings or start a fresh run"
        )
    return stats


def compensate(
    cfg: Config, prev: dict[str, torch.Tensor], hidden: drift.FeaturePairs, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Earlier tasks' (sums, gram) moved into the current projected space (``train.drift``; ``hidden``: this task's
    projected pairs); as stored with none."""
    sums, gram, count = prev["ridge_sums"], prev["ridge_gram"], prev["ridge_count"]
    if cfg.train.drift == "none":
        return sums, gram
    paired = drift.reduce_paired_sums(hidden, prev["ridge_projection"].shape[1], device)
    if cfg.train.drift == "linear":
        return drift.fit_linear_map(paired, cfg.train.drift_ridge).raw_sums(count, sums, gram)
    means = sums / count.clamp(min=1)[:, None]
    sigma2 = drift.sdc_sigma2(paired, cfg.train.sdc_bandwidth)
    shifts = drift.sdc_shifts(hidden, means, sigma2, device)
    return drift.shift_raw_sums(count, sums, gram, shifts)


def run(
    cfg: Config, model: nn.Module, task: int, env: dist.DistEnv, pairs: drift.FeaturePairs, times: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Fit and install the ridge head of ``task`` on every rank; returns the cumulative statistics to checkpoint.

    ``pairs.new`` holds this task's train features after training (``pairs.old`` too when drift is on).
    """
    mark = time.perf_counter()
    t = cfg.train
    prev = previous_sums(cfg, task, env.device)
    proj = random_projection(model.head.in_features, t.ridge_dim, t.seed) if prev is None else prev["ridge_projection"]
    hidden = projected(pairs, proj)
    own = task_sums(hidden, t.ridge_dim, model.task_classes[task], model.class_offset(task), env.device)
    count, sums, gram = own["count"], own["sums"], own["gram"]
    if prev is not None:
        old_sums, old_gram = compensate(cfg, prev, hidden, env.device)
        count, sums, gram = torch.cat([prev["ridge_count"], count]), torch.cat([old_sums, sums]), old_gram + gram
    times["ridge_stats"] = time.perf_counter() - mark
    mark = time.perf_counter()
    weight = solve(gram, sums, t.ridge_lambda).float() if is_rank_zero() else torch.zeros(len(count), t.ridge_dim)
    weight = weight.to(env.device)
    dist.broadcast_tensors([weight], src=0)
    weight = weight.cpu()
    head = RidgeHead(proj, weight)
    model.inference_head = head.to(env.device)
    times["ridge_solve"] = time.perf_counter() - mark
    digest = checksum(head)
    dist.assert_ranks_agree(digest, f"ridge head after task {task}")
    log_all_ranks(f"task {task}: ridge head checksum {digest[:16]}")
    log_rank_zero(f"task {task}: ridge head solved on {len(count)} classes (M = {t.ridge_dim})")
    return {
        "ridge_count": count,
        "ridge_sums": sums,
        "ridge_gram": gram,
        "ridge_projection": proj.float(),
        "ridge_weight": weight,
    }
