"""Drift compensation of stored class statistics, with no old images (``train.drift``). Not part of SD-LoRA.

Each task moves the backbone, so statistics measured under an earlier model (head_align's class Gaussians, the
ridge head's Gram sums) describe features the old classes no longer have. After task t's training, and before the
statistics are used, every earlier class's statistics are moved into the current feature space with a map estimated
from task t's *own* train samples seen twice: under the model as it was when task t-1 ended (the model the stored
statistics belong to; it is exactly the model at the start of ``run_task``, before consolidation, so the "before"
pass needs no second copy of the backbone and a resumed run repeats it from task t-1's checkpoint), and under the
model after task t.

``linear`` (LDC-style): an affine map ``x_new ~= A x_old + b`` fitted by least squares, regularised towards the
identity (``||A - I||^2`` weighted by ``train.drift_ridge`` times the mean feature energy): with few samples the
directions they do not span stay where they were instead of collapsing to zero, and a backbone that did not move
gives exactly ``A = I, b = 0``. Applied to means (``A mu + b``), covariances and scatters (``A C A^T``), variances
(the diagonal of ``A diag(v) A^T``) and to raw sums (count, sum, second moment) such as the ridge head's Gram
matrix, where the identity ``sum (A h + b)(A h + b)^T = A G A^T + A s b^T + b s^T A^T + n b b^T`` is exact.

``sdc`` (semantic drift compensation): each old class mean moves by the average displacement ``x_new - x_old`` of
the current samples, weighted by ``exp(-||x_old - mu_c||^2 / (2 sigma^2))`` with ``sigma^2`` = ``train.sdc_bandwidth``
times the samples' mean squared distance to their own mean. It moves means only (covariances stay; Gram sums get the
per-class translation).

Which one: measured in BENCHMARKS.md ("Drift compensation and the ridge head"), Animal-MNIST silhouettes and
digits, glyph-pretrained toy ViT, 3 seeds. At the recipe's learning rate the backbone moves little (features change
by about 1.5 % per task; both modes move the old class means by 0.8 %) and neither mode changes Acc by more than
one standard error. At lr 0.1 (a mobile backbone: the Gaussian head forgets 44 points) both help the Gaussian head on
every seed, by the same Acc (+4.6 ``linear``, +4.8 ``sdc``), but ``linear`` keeps more of the old tasks (forgetting
27.8 against 34.1, task 0 at the end 22.1 against 17.5), and it is the only one that also moves second moments
(covariances, the ridge head's Gram sums) and is exact under a linear change of the features: ``linear`` is the
documented choice. Neither helps the ridge head there (its map lives in the M-dimensional projected space and is
fitted from one task's samples).
``sdc`` stays selectable for comparison. Every sum is float64 and all-reduced like head_align's statistics, and the
map is solved from the reduced sums on every rank: 1 and 2 ranks give the same map (up to float64 summation order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from sdlora_dist.config import Config
from sdlora_dist.data import Manifest, TransformSpec, make_eval_loader
from sdlora_dist.jobs import distributed as dist

# ---------------------------------------------------------------------------------------------------------------------
# Paired features (one rank's share of the current task's train samples, before and after the task)


@dataclass
class FeaturePairs:
    """One rank's current-task samples in loader order: their keys, labels and features before/after the task."""

    keys: list[str] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    old: list[torch.Tensor] = field(default_factory=list)  # [B, d] float64 per batch, model at the task's start
    new: list[torch.Tensor] = field(default_factory=list)  # [B, d] float64 per batch, model after the task

    def batches(
        self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(old, new) per batch, each passed through ``transform`` (e.g. the ridge head's projection)."""
        if len(self.old) != len(self.new):
            raise RuntimeError(f"{len(self.old)} batches before the task but {len(self.new)} after it")
        for old, new in zip(self.old, self.new, strict=True):
            yield (old, new) if transform is None else (transform(old), transform(new))


@torch.no_grad()
def collect_features(
    cfg: Config,
    model: torch.nn.Module,
    task: int,
    env: dist.DistEnv,
    spec: TransformSpec,
    manifest: Manifest | None,
    pairs: FeaturePairs | None = None,
) -> FeaturePairs:
    """One pass over this rank's share of ``task``'s train samples (eval transform): features in loader order.

    ``pairs`` None: a new record whose ``old`` features are the model's now (call before the task trains).
    Otherwise its ``new`` features are filled; the samples must be the same ones, in the same order.
    """
    model.eval()
    loader = make_eval_loader(
        cfg.data.shards,
        [task],
        spec=spec,
        batch_size=cfg.data.eval_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        corrupt=cfg.data.corrupt,
        bad_shard=cfg.data.bad_shard,
        cache_dir=cfg.data.cache_dir,
        with_keys=True,
        split="train",
        manifest=manifest,
    )
    dtype = next(model.parameters()).dtype
    keys: list[str] = []
    out = FeaturePairs() if pairs is None else pairs
    for x, y, batch_keys in loader:
        feats = model.features(x.to(env.device, dtype)).detach().to("cpu", torch.float64)
        keys.extend(batch_keys)
        if pairs is None:
            out.old.append(feats)
            out.labels.append(y.cpu())
        else:
            out.new.append(feats)
    model.train()
    if pairs is None:
        out.keys = keys
    elif keys != pairs.keys:  # a skipped corrupt sample or another shard order would pair wrong features
        raise RuntimeError(
            f"task {task}: the samples after training differ from those before it "
            f"({len(keys)} vs {len(pairs.keys)} on rank {env.rank})"
        )
    return out


def collect_new_features(
    cfg: Config, model: torch.nn.Module, task: int, env: dist.DistEnv, spec: TransformSpec, manifest: Manifest | None
) -> FeaturePairs:
    """The current task's features after training only (no earlier model to pair with: task 0, or drift none)."""
    pairs = collect_features(cfg, model, task, env, spec, manifest)
    pairs.new, pairs.old = pairs.old, []
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# The linear map (pure tensor functions)


def paired_sums(old: torch.Tensor, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 sums of one batch for the fit: ``xx`` = sum x~ x~^T, ``xy`` = sum x~ y^T (x~ = [x_old, 1]), ``moved``.

    ``moved`` is the summed squared change ``||x_new - x_old||^2``: exactly zero when the backbone did not move.
    """
    x = torch.cat([old.double(), torch.ones(old.shape[0], 1, dtype=torch.float64)], dim=1)  # [B, d + 1]
    y = new.double()
    return {"xx": x.T @ x, "xy": x.T @ y, "moved": ((y - old.double()) ** 2).sum().reshape(1)}


def reduce_paired_sums(
    pairs: FeaturePairs,
    dim: int,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`paired_sums` over every rank's pairs, all-reduced (zeros on a rank without samples)."""
    total = {
        "xx": torch.zeros(dim + 1, dim + 1, dtype=torch.float64),
        "xy": torch.zeros(dim + 1, dim, dtype=torch.float64),
        "moved": torch.zeros(1, dtype=torch.float64),
    }
    for old, new in pairs.batches(transform):
        for key, value in paired_sums(old, new).items():
            total[key] += value
    return {k: dist.all_reduce_sum(v.to(device)).cpu() for k, v in total.items()}


@dataclass
class LinearMap:
    """``x_new = x_old @ weight.T + bias`` (weight [d, d], bias [d]); ``identity``: the backbone did not move."""

    weight: torch.Tensor
    bias: torch.Tensor
    identity: bool = False

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """Map features or means [..., d]."""
        return x if self.identity else (x.double() @ self.weight.T + self.bias).to(x.dtype)

    def second(self, c: torch.Tensor) -> torch.Tensor:
        """Map covariances or scatters [..., d, d] (translation does not change them): ``A C A^T``."""
        return c if self.identity else (self.weight @ c.double() @ self.weight.T).to(c.dtype)

    def variances(self, v: torch.Tensor) -> torch.Tensor:
        """Map diagonal covariances [n, d]: the diagonal of ``A diag(v) A^T`` = ``v @ (A * A)^T``."""
        return v if self.identity else (v.double() @ (self.weight**2).T).to(v.dtype)

    def raw_sums(
        self, count: torch.Tensor, sums: torch.Tensor, gram: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map per-class sums [n, d] and one Gram sum [d, d] of the points they summarise (counts [n]).

        Exact for an affine map: sum (A x + b) = A s + n b and sum (A x + b)(A x + b)^T = A G A^T + A s b^T
        + b s^T A^T + n b b^T, with s the sum over all classes.
        """
        if self.identity:
            return sums, gram
        a, b = self.weight, self.bias
        new_sums = sums.double() @ a.T + count.double()[:, None] * b  # [n, d]
        s = sums.double().sum(0)  # [d]
        n = count.double().sum()
        new_gram = a @ gram.double() @ a.T + torch.outer(a @ s, b) + torch.outer(b, a @ s) + n * torch.outer(b, b)
        return new_sums.to(sums.dtype), new_gram.to(gram.dtype)


def fit_linear_map(sums: dict[str, torch.Tensor], ridge: float) -> LinearMap:
    """The ridge fit of :class:`LinearMap` from :func:`paired_sums`, regularised towards the identity.

    Minimises ``sum ||A x_old + b - x_new||^2 + lam ||A - I||^2`` with ``lam = ridge * trace(sum x x^T) / d``
    (scale-free; ``b`` is not penalised). A backbone that did not move (``moved == 0``) gives the identity exactly.
    """
    xx, xy = sums["xx"].double(), sums["xy"].double()
    d = xy.shape[1]
    if float(sums["moved"]) == 0.0:
        return LinearMap(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), identity=True)
    lam = ridge * float(torch.diagonal(xx)[:d].sum()) / d
    penalty = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    penalty[:d, :d] = torch.eye(d, dtype=torch.float64) * lam
    target = torch.zeros(d + 1, d, dtype=torch.float64)
    target[:d] = torch.eye(d, dtype=torch.float64) * lam  # pulls A towards I, not towards 0
    solution = torch.linalg.solve(xx + penalty, xy + target)  # [d + 1, d]: rows of A^T, then b
    return LinearMap(solution[:d].T.contiguous(), solution[d].clone())


# ---------------------------------------------------------------------------------------------------------------------
# Semantic drift compensation (distance-weighted mean shift)


def sdc_sums(old: torch.Tensor, new: torch.Tensor, means: torch.Tensor, sigma2: float) -> dict[str, torch.Tensor]:
    """Float64 sums of one batch: per class c the weights ``w`` [n] and weighted displacements ``shift`` [n, d]."""
    x, y = old.double(), new.double()
    dist2 = torch.cdist(means.double(), x) ** 2  # [n, B]
    w = torch.exp(-dist2 / (2 * sigma2))
    return {"w": w.sum(1), "shift": w @ (y - x)}


def sdc_sigma2(sums: dict[str, torch.Tensor], bandwidth: float) -> float:
    """``bandwidth`` times the samples' mean squared distance to their mean, from :func:`paired_sums`'s ``xx``."""
    xx = sums["xx"]
    d = xx.shape[0] - 1
    n = float(xx[d, d])
    mean = xx[d, :d] / max(n, 1.0)
    spread = float(torch.diagonal(xx)[:d].sum()) / max(n, 1.0) - float(mean @ mean)
    return bandwidth * max(spread, 1e-12)


def sdc_shifts(
    pairs: FeaturePairs,
    means: torch.Tensor,
    sigma2: float,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-class mean shifts [n, d] (float64) from every rank's pairs (all-reduced weighted displacements)."""
    n, d = means.shape
    w, shift = torch.zeros(n, dtype=torch.float64), torch.zeros(n, d, dtype=torch.float64)
    for old, new in pairs.batches(transform):
        part = sdc_sums(old, new, means, sigma2)
        w += part["w"]
        shift += part["shift"]
    w, shift = dist.all_reduce_sum(w.to(device)).cpu(), dist.all_reduce_sum(shift.to(device)).cpu()
    return shift / w.clamp(min=1e-300)[:, None]  # a class far from every sample gets (almost) no shift


def shift_raw_sums(
    count: torch.Tensor, sums: torch.Tensor, gram: torch.Tensor, shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Translate class c by ``shifts[c]``: sums + n_c d_c; G + sum_c (s_c d_c^T + d_c s_c^T + n_c d_c d_c^T)."""
    s, delta, n = sums.double(), shifts.double(), count.double()
    cross = s.T @ delta  # [d, d] = sum_c s_c delta_c^T
    new_gram = gram.double() + cross + cross.T + (delta * n[:, None]).T @ delta
    return (s + n[:, None] * delta).to(sums.dtype), new_gram.to(gram.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's hooks (every rank calls them)


def before_task(
    cfg: Config,
    model: torch.nn.Module,
    task: int,
    env: dist.DistEnv,
    spec: TransformSpec,
    manifest: Manifest | None,
    times: dict[str, float],
) -> FeaturePairs | None:
    """With ``train.drift`` on and an earlier task: this task's train features under the model as task-1 left it.

    Called at the start of ``run_task``, before consolidation, when the model is exactly task t-1's checkpoint
    (also after ``--resume``/``--continue``, which reload it).
    """
    if cfg.train.drift == "none" or task == 0:
        return None
    start = time.perf_counter()
    pairs = collect_features(cfg, model, task, env, spec, manifest)
    times["drift_before"] = time.perf_counter() - start
    return pairs


def after_task(
    cfg: Config,
    model: torch.nn.Module,
    task: int,
    env: dist.DistEnv,
    spec: TransformSpec,
    manifest: Manifest | None,
    pairs: FeaturePairs | None,
    times: dict[str, float],
) -> FeaturePairs | None:
    """The trained task's train features (paired with ``pairs``), when drift or the ridge head needs them."""
    if cfg.train.drift == "none" and cfg.train.head == "linear":
        return None
    start = time.perf_counter()
    if pairs is None:
        out = collect_new_features(cfg, model, task, env, spec, manifest)
    else:
        out = collect_features(cfg, model, task, env, spec, manifest, pairs)
    times["features_after"] = time.perf_counter() - start
    return out
