"""Opt-in classifier alignment from class feature statistics (SLCA-style). Not part of SD-LoRA.

The paper trains the head with cross-entropy over the current task's logits only, so rows of different tasks are
never ranked against each other and the bias between task groups is never corrected. With
``train.head_align: gaussian``, after a task's training and before its evaluation:

1. :func:`collect_task_sums`: one pass over the task's *train* shards (eval transform, each sample exactly once
   across ranks and workers) sums, per class, the count, the feature and the outer product (``diag``: the square)
   of the feature the head sees. The float64 sums are all-reduced: every rank holds the sums of one pass over all
   of the task's samples.
2. :func:`finalize`: per class mean and covariance (``full``), variance (``diag``), or the task's share of one
   pooled within-class scatter (``shared``). A task's file holds only its own classes; earlier tasks' statistics
   come from their checkpoints, so they are features of the model *at their time* (later tasks move the backbone).
   With ``train.drift`` other than ``none`` (drift.py) the file of task t instead holds *every* seen class's
   statistics (marked ``drift_cumulative``): task t-1's, moved into task t's feature space by the map fitted on
   task t's own samples, followed by task t's.
3. :func:`align_head`: rank 0 retrains the head rows of every seen class on features drawn from the Gaussians
   (seeded generator, backbone and adapters untouched) and broadcasts them; the recipe's checksum agreement covers
   the head (``adapter_checksum`` hashes every non-W0 tensor, head included).

With ``none`` (the default: the paper) :func:`run` returns at once: no pass, no RNG draw, no collective, no file.

Stored tensors per task (``head_stats.safetensors`` in the task folder), n = the task's classes, d = feature width:
``count`` [n] f64, ``mean`` [n, d] f32 and ``cov`` [n, d, d] f32 (full) | ``var`` [n, d] f32 (diag) |
``scatter`` [d, d] f32 + ``dof`` [1] f64 (shared: the pooled covariance is sum(scatter) / sum(dof) over tasks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdlora_dist import checkpoint as ckpt
from sdlora_dist import drift
from sdlora_dist.config import Config
from sdlora_dist.data import Manifest, TransformSpec, make_eval_loader
from sdlora_dist.errors import UserError
from sdlora_dist.jobs import distributed as dist
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.logs import log_all_ranks, log_rank_zero

COV_MODES = ("full", "shared", "diag")
_EIG_FLOOR = 1e-6  # relative to the largest eigenvalue: sample covariances from n < d samples are singular
_MOMENTUM = 0.9


# ---------------------------------------------------------------------------------------------------------------------
# Statistics (pure tensor functions)


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cov: str) -> dict[str, torch.Tensor]:
    """Float64 sums of one batch: ``count`` [n], ``sum`` [n, d] and ``second`` ([n, d, d] | [n, d] | [d, d]).

    ``labels`` are task-local (0..num_classes-1). ``second`` is the sum of outer products per class (``full``), of
    squares per class (``diag``) or of outer products over the whole batch (``shared``: only the pooled scatter
    is kept, so per-class second moments are never needed).
    """
    f = features.detach().to("cpu", torch.float64)  # [B, d]
    y = labels.to("cpu", torch.int64)
    d = f.shape[1]
    out = {
        "count": torch.bincount(y, minlength=num_classes).double(),
        "sum": torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, f),
    }
    if cov == "full":
        second = torch.zeros(num_classes, d, d, dtype=torch.float64)
        for c in y.unique().tolist():
            fc = f[y == c]
            second[c] = fc.T @ fc
        out["second"] = second
    elif cov == "diag":
        out["second"] = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, f * f)
    else:
        out["second"] = f.T @ f
    return out


def add_sums(total: dict[str, torch.Tensor] | None, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + batch`` key by key (``total`` None: the first batch)."""
    if total is None:
        return {k: v.clone() for k, v in batch.items()}
    for key, value in batch.items():
        total[key] += value
    return total


def _finalize_full(count: torch.Tensor, mean: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    scatter = second - count[:, None, None] * mean[:, :, None] * mean[:, None, :]  # [n, d, d]
    cov = scatter / (count - 1).clamp(min=1)[:, None, None]
    return {"cov": cov.float()}


def _finalize_diag(count: torch.Tensor, mean: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    var = (second - count[:, None] * mean * mean).clamp(min=0) / (count - 1).clamp(min=1)[:, None]
    return {"var": var.float()}


def _finalize_shared(count: torch.Tensor, mean: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    scatter = second - (mean * count[:, None]).T @ mean  # sum_x x x^T - sum_c n_c mu_c mu_c^T: within-class scatter
    return {"scatter": scatter.float(), "dof": (count.sum() - count.numel()).reshape(1)}


FINALIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]] = {
    "full": _finalize_full,
    "diag": _finalize_diag,
    "shared": _finalize_shared,
}


def finalize(sums: dict[str, torch.Tensor], cov: str) -> dict[str, torch.Tensor]:
    """The stored statistics of one task's classes from its summed ``count``/``sum``/``second`` (float64)."""
    count = sums["count"]
    if bool((count == 0).any()):
        missing = torch.nonzero(count == 0).flatten().tolist()
        raise UserError(f"head_align: task-local classes {missing} have no readable train sample; check the shards")
    mean = sums["sum"] / count[:, None]
    return {"count": count, "mean": mean.float(), **FINALIZERS[cov](count, mean, sums["second"])}


def merge_tasks(per_task: list[dict[str, torch.Tensor]], cov: str) -> dict[str, torch.Tensor]:
    """Statistics of all seen classes in label order: ``count``, ``mean`` and ``cov`` | ``var`` | pooled ``cov``."""
    merged = {key: torch.cat([s[key] for s in per_task]) for key in ("count", "mean")}
    if cov == "full":
        merged["cov"] = torch.cat([s["cov"] for s in per_task])
    elif cov == "diag":
        merged["var"] = torch.cat([s["var"] for s in per_task])
    else:
        dof = sum(float(s["dof"]) for s in per_task)
        merged["cov"] = sum(s["scatter"].double() for s in per_task) / max(dof, 1.0)
    return merged


def stats_bytes(cov: str, num_classes: int, dim: int, num_tasks: int = 1) -> int:
    """Bytes of the stored statistics (the layout in the module docstring) for ``num_classes`` classes of width d."""
    per_class = 8 + 4 * dim + {"full": 4 * dim * dim, "diag": 4 * dim, "shared": 0}[cov]
    return num_classes * per_class + (num_tasks * (4 * dim * dim + 8) if cov == "shared" else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and head retraining (pure tensor functions)


def covariance_roots(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 factors R with R R^T = covariance (per class [n, d, d], shared [d, d]) or standard deviations [n, d].

    A symmetric eigen-decomposition, not Cholesky: a covariance from fewer samples than dimensions is singular,
    and small negative eigenvalues from rounding are clamped to a floor instead of failing.
    """
    if "var" in stats:
        return stats["var"].double().clamp(min=0).sqrt()
    cov = stats["cov"].double()
    cov = (cov + cov.transpose(-1, -2)) / 2
    vals, vecs = torch.linalg.eigh(cov)
    floor = _EIG_FLOOR * vals.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return vecs * vals.clamp(min=0).maximum(floor).sqrt().unsqueeze(-2)


def sample_features(
    mean: torch.Tensor, roots: torch.Tensor, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` draws of N(mean_c, R_c R_c^T) for every class c: features [n * per_class, d] f32, labels.

    ``roots`` is [n, d] (standard deviations) or [n, d, d] (a shared factor may be an expanded view).
    """
    n, d = mean.shape
    feats = []
    for c in range(n):  # one class at a time: d x d x per_class in float64 at most
        z = torch.randn(per_class, d, generator=generator, dtype=torch.float64)
        root = roots[c]  # [d] standard deviations or [d, d] factor
        draw = z * root if root.dim() == 1 else z @ root.T
        feats.append((mean[c].double() + draw).float())
    return torch.cat(feats), torch.arange(n).repeat_interleave(per_class)


def align_head(
    weight: torch.Tensor,
    bias: torch.Tensor,
    stats: dict[str, torch.Tensor],
    *,
    epochs: int,
    per_class: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrain a linear head [C, d] on features sampled from the class Gaussians (cross-entropy over all classes).

    Starts from the given head (SLCA fine-tunes, it does not re-initialise), fresh samples every epoch, SGD with
    momentum. Every draw comes from ``generator``: the result is a function of its seed and the inputs.
    """
    mean = stats["mean"]
    if mean.shape != (weight.shape[0], weight.shape[1]):
        raise ValueError(f"statistics of {tuple(mean.shape)} do not match a head of {tuple(weight.shape)}")
    roots = covariance_roots(stats)
    if "var" not in stats and roots.dim() == 2:  # one pooled covariance shared by every class
        roots = roots.expand(mean.shape[0], -1, -1)
    w = weight.detach().to(device, torch.float32).clone().requires_grad_(True)
    b = bias.detach().to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w, b], lr=lr, momentum=_MOMENTUM)
    for _ in range(epochs):
        x, y = sample_features(mean, roots, per_class, generator)
        order = torch.randperm(len(y), generator=generator)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(F.linear(x[idx].to(device), w, b), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return w.detach(), b.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Drift-compensated statistics (train.drift: every rank computes the same cumulative statistics)

CUMULATIVE_KEY = "drift_cumulative"


def sums_from_pairs(pairs: drift.FeaturePairs, num_classes: int, offset: int, cov: str, d: int,
                    device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`collect_task_sums` from features already collected (``pairs.new``, width d), all-reduced over ranks."""
    second = {"full": (num_classes, d, d), "diag": (num_classes, d), "shared": (d, d)}[cov]
    total = {
        "count": torch.zeros(num_classes, dtype=torch.float64),
        "sum": torch.zeros(num_classes, d, dtype=torch.float64),
        "second": torch.zeros(second, dtype=torch.float64),
    }
    for feats, labels in zip(pairs.new, pairs.labels, strict=True):
        add_sums(total, class_sums(feats, labels - offset, num_classes, cov))
    return {k: dist.all_reduce_sum(v.to(device)).cpu() for k, v in total.items()}


def compensate_stats(stats: dict[str, torch.Tensor], pairs: drift.FeaturePairs, cfg: Config,
                     device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """Cumulative statistics of earlier classes moved into the current feature space (``train.drift``)."""
    d = stats["mean"].shape[1]
    paired = drift.reduce_paired_sums(pairs, d, device)
    out = dict(stats)
    if cfg.train.drift == "sdc":  # means only; second moments stay
        shifts = drift.sdc_shifts(pairs, stats["mean"], drift.sdc_sigma2(paired, cfg.train.sdc_bandwidth), device)
        out["mean"] = (stats["mean"].double() + shifts).float()
        return out
    linear = drift.fit_linear_map(paired, cfg.train.drift_ridge)
    out["mean"] = linear.points(stats["mean"])
    for key in ("cov", "scatter"):
        if key in stats:
            out[key] = linear.second(stats[key])
    if "var" in stats:
        out["var"] = linear.variances(stats["var"])
    return out


def join_stats(prev: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Earlier classes then this task's, in one cumulative record (shared: scatters and dof summed)."""
    out = {key: torch.cat([prev[key], own[key]]) for key in ("count", "mean", "cov", "var") if key in own}
    if "scatter" in own:
        out["scatter"] = prev["scatter"] + own["scatter"]
        out["dof"] = prev["dof"] + own["dof"]
    return out


def _read_cumulative(cfg: Config, task: int) -> dict[str, torch.Tensor]:
    """Task ``task``'s stored statistics of every seen class (with drift on), from the run directory."""
    prev = ckpt.load_head_stats(Path(cfg.run_dir), task)
    if prev is None or CUMULATIVE_KEY not in prev:
        raise UserError(
            f"task {task} of {cfg.run_dir} has no drift-compensated head statistics: it was trained with "
            "another train.head_align/drift; keep the run's settings or start a fresh run"
        )
    return prev


def cumulative_stats(cfg: Config, model: torch.nn.Module, task: int, env: dist.DistEnv,
                     pairs: drift.FeaturePairs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:  # fmt: skip
    """Every seen class's statistics in the current feature space (what task ``task``'s file holds with drift),
    and for the record the mean relative shift of the earlier class means (``drift_mean_shift``)."""
    cov = cfg.train.head_align_cov
    n_cls, offset, d = model.task_classes[task], model.class_offset(task), model.head.in_features
    own = finalize(sums_from_pairs(pairs, n_cls, offset, cov, d, env.device), cov)
    if task > 0:
        prev = dist.tensors_from_rank_zero(lambda: _read_cumulative(cfg, task - 1), env.device)
        moved = compensate_stats(prev, pairs, cfg, env.device)
        shift = (moved["mean"] - prev["mean"]).norm(dim=1) / prev["mean"].norm(dim=1).clamp(min=1e-12)
        shift_info = {"drift_mean_shift": float(shift.mean())}  # how far the map moved the old means (relative)
        own = join_stats(moved, own)
        return {**own, CUMULATIVE_KEY: torch.ones(1)}, shift_info
    return {**own, CUMULATIVE_KEY: torch.ones(1)}, {}


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's step (every rank calls run(); rank 0 aligns and broadcasts)


@dataclass
class AlignResult:
    """What :func:`run` did for one task: the statistics to checkpoint and the record for metrics.json."""

    mode: str
    stats: dict[str, torch.Tensor] | None = None  # this task's classes only (None with 'none')
    before: list[int] | None = None  # correct counts per task group before alignment
    info: dict[str, Any] = field(default_factory=dict)

    def record(self, correct: list[int], totals: list[int]) -> dict[str, Any]:
        """``{"mode": ...}`` plus, when aligned, top-1 over seen classes before and after (percent)."""
        if self.before is None:
            return {"mode": self.mode}
        top1 = lambda counts: 100.0 * sum(counts) / max(1, sum(totals))  # noqa: E731
        return {"mode": self.mode, **self.info, "before": {"correct": self.before, "top1": top1(self.before)},
                "after": {"correct": list(correct), "top1": top1(correct)},
                "gain": top1(correct) - top1(self.before)}  # fmt: skip


@torch.no_grad()
def collect_task_sums(
    cfg: Config,
    model: torch.nn.Module,
    task: int,
    env: dist.DistEnv,
    spec: TransformSpec,
    manifest: Manifest | None = None,
) -> dict[str, torch.Tensor]:
    """Per-class float64 sums over all of ``task``'s train samples (eval transform), all-reduced over ranks.

    ``manifest``: the run's view of the shards (its class order and split; default the shard set's own)."""
    model.eval()
    offset, n_cls = model.class_offset(task), model.task_classes[task]
    dtype = next(model.parameters()).dtype
    loader = make_eval_loader(
        cfg.data.shards, [task], spec=spec, batch_size=cfg.data.eval_batch_size, rank=env.rank,
        world_size=env.world_size, num_workers=cfg.data.num_workers, corrupt=cfg.data.corrupt,
        bad_shard=cfg.data.bad_shard, cache_dir=cfg.data.cache_dir, split="train", manifest=manifest,
    )  # fmt: skip
    d = model.head.in_features
    second = {"full": (n_cls, d, d), "diag": (n_cls, d), "shared": (d, d)}[cfg.train.head_align_cov]
    # zeros, not None: a rank may get no batch at all and must still join the all-reduce
    total = {
        "count": torch.zeros(n_cls, dtype=torch.float64),
        "sum": torch.zeros(n_cls, d, dtype=torch.float64),
        "second": torch.zeros(second, dtype=torch.float64),
    }
    for x, y in loader:
        feats = model.features(x.to(env.device, dtype))
        add_sums(total, class_sums(feats, y - offset, n_cls, cfg.train.head_align_cov))
    model.train()
    return {k: dist.all_reduce_sum(v.to(env.device)).cpu() for k, v in total.items()}


def load_previous_stats(run_dir: Path, task: int, cov: str) -> list[dict[str, torch.Tensor]]:
    """The stored statistics of tasks 0..task-1 (from their checkpoints), checked against ``cov``."""
    key = {"full": "cov", "diag": "var", "shared": "scatter"}[cov]
    out = []
    for j in range(task):
        stats = ckpt.load_head_stats(run_dir, j)
        if stats is None or key not in stats:
            raise UserError(
                f"task {j} of {run_dir} has no {cov!r} head statistics ({ckpt.HEAD_STATS_FILE}): it was trained "
                f"with another train.head_align/head_align_cov; keep the run's settings or start a fresh run"
            )
        out.append(stats)
    return out


def _head_checksum(model: torch.nn.Module) -> str:
    import hashlib

    w, b = model.head.full()
    return hashlib.sha256(w.detach().float().cpu().numpy().tobytes() + b.detach().float().cpu().numpy().tobytes()
                          ).hexdigest()  # fmt: skip


def set_head(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write [C, d] / [C] back into the per-task rows (requires_grad flags stay as they are)."""
    rows = 0
    with torch.no_grad():
        for key, w in model.head.weight.items():
            n = w.shape[0]
            w.copy_(weight[rows : rows + n].to(w))
            model.head.bias[key].copy_(bias[rows : rows + n].to(w))
            rows += n


def _gaussian(cfg: Config, model: torch.nn.Module, task: int, env: dist.DistEnv, spec: TransformSpec,
              manifest: Manifest | None, evaluate: Callable[..., tuple[list, list]],
              times: dict[str, float], pairs: drift.FeaturePairs | None = None) -> AlignResult:  # fmt: skip
    t = cfg.train
    mark = time.perf_counter()
    before, _ = evaluate(cfg, model, task, env, spec, manifest)
    times["eval_before_align"] = time.perf_counter() - mark
    mark = time.perf_counter()
    drift_info: dict[str, Any] = {}
    if pairs is None:  # drift none: as before issue 21
        stats = finalize(collect_task_sums(cfg, model, task, env, spec, manifest), t.head_align_cov)
    else:
        stats, drift_info = cumulative_stats(cfg, model, task, env, pairs)
    times["head_stats"] = time.perf_counter() - mark
    mark = time.perf_counter()
    if is_rank_zero():
        stored = [stats] if pairs is not None else [*load_previous_stats(Path(cfg.run_dir), task, t.head_align_cov),
                                                    stats]  # fmt: skip
        seen = merge_tasks(stored, t.head_align_cov)
        generator = torch.Generator().manual_seed(t.seed * 1000 + task)  # private: the global RNG is not touched
        weight, bias = model.head.full()
        weight, bias = align_head(weight, bias, seen, epochs=t.head_align_epochs, per_class=t.head_align_samples,
                                  lr=t.head_align_lr, batch_size=t.head_align_batch_size, generator=generator,
                                  device=env.device)  # fmt: skip
        set_head(model, weight, bias)
    dist.broadcast_tensors([p.data for p in [*model.head.weight.values(), *model.head.bias.values()]], src=0)
    times["head_align"] = time.perf_counter() - mark
    log_all_ranks(f"task {task}: aligned head checksum {_head_checksum(model)[:16]}")
    num_classes, d = sum(model.task_classes), model.head.in_features
    info = {"cov": t.head_align_cov, "stats_bytes": stats_bytes(t.head_align_cov, num_classes, d, task + 1)}
    info |= drift_info
    log_rank_zero(f"task {task}: head aligned on {num_classes} classes ({info['stats_bytes'] / 1e6:.2f} MB stats)")
    return AlignResult("gaussian", stats, before, info)


def _none(*_: Any) -> AlignResult:
    return AlignResult("none")


ALIGNERS: dict[str, Callable[..., AlignResult]] = {"none": _none, "gaussian": _gaussian}


def run(
    cfg: Config,
    model: torch.nn.Module,
    task: int,
    env: dist.DistEnv,
    spec: TransformSpec,
    manifest: Manifest | None,
    evaluate: Callable[..., tuple[list, list]],
    times: dict[str, float],
    pairs: drift.FeaturePairs | None = None,
) -> AlignResult:
    """``train.head_align`` for ``task`` on every rank: nothing (``none``) or evaluate, collect, align (``gaussian``).

    ``pairs`` (``train.drift`` on): this task's train features after training (and before it, from task 1), already
    collected; the statistics then come from them and are stored cumulatively.

    ``manifest`` is the run's view of the shards (class order and split). ``evaluate`` is the recipe's evaluation
    (counts per task group), called once more to record the accuracy before alignment; ``times`` gets
    ``eval_before_align``, ``head_stats`` and ``head_align`` (seconds).
    """
    return ALIGNERS[cfg.train.head_align](cfg, model, task, env, spec, manifest, evaluate, times, pairs)
