"""Planning from the manifest's counts: which samples each train stream and each eval reader gets.

Nothing here reads a shard: the pieces are cut from the per-shard sample counts, so every rank computes the same
plan. See ``data.loader`` for how the pieces become batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdlora_dist.data.manifest import Manifest, ShardInfo
from sdlora_dist.errors import UserError
from sdlora_dist.logs import log_warning


@dataclass(frozen=True)
class Segment:
    """Samples ``[first, stop)`` of one shard, read by one stream (``first > 0``: it starts inside the shard)."""

    shard: ShardInfo
    first: int
    stop: int


Piece = list[Segment]


def cut_pieces(counts: list[int], pieces: int, cap: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Cut shards (in order, with ``counts``) into ``pieces`` contiguous runs of near-equal length.

    Returns per piece its ``(shard index, first, stop)`` runs. Cut k aims at ``k * N / pieces`` and snaps to the
    nearest shard boundary within half a piece, so most pieces are whole shards (read once). ``cap`` bounds every
    piece (train: the samples a stream emits per epoch); a cut that cannot snap inside the bounds falls inside a
    shard, which the later piece opens at its first sample (``reading.tar_samples``).
    """
    total = sum(counts)
    bounds = np.cumsum([0] + list(counts))
    cuts, prev = [0], 0
    for k in range(1, pieces):
        target = round(k * total / pieces)
        lo = prev if cap is None else max(prev, total - cap * (pieces - k))
        hi = total if cap is None else min(total, prev + cap)
        near = bounds[(bounds >= lo) & (bounds <= hi)]
        best = int(near[np.argmin(np.abs(near - target))]) if len(near) else None
        prev = best if best is not None and abs(best - target) <= total / pieces / 2 else min(max(target, lo), hi)
        cuts.append(prev)
    cuts.append(total)
    out = []
    for begin, end in zip(cuts[:-1], cuts[1:], strict=True):
        runs = [(i, max(begin - int(bounds[i]), 0), min(end - int(bounds[i]), c)) for i, c in enumerate(counts)]
        out.append([run for run in runs if run[1] < run[2]])
    return out


def plan_pieces(shards: list[ShardInfo], pieces: int, cap: int | None) -> list[Piece]:
    """``cut_pieces`` as segments of ``shards`` (empty shards left out)."""
    shards = [s for s in shards if s.count > 0]
    return [
        [Segment(shards[i], a, b) for i, a, b in piece]
        for piece in cut_pieces([s.count for s in shards], pieces, cap)
    ]


def train_streams(shards: list[ShardInfo], *, seed: int, task: int, epoch: int, streams: int, cap: int) -> list[Piece]:
    """The pieces of epoch ``epoch``'s ``streams`` train streams: the task's shards permuted with
    ``(seed, task, epoch)``, cut into pieces of at most ``cap`` samples. A task with fewer samples than streams
    leaves pieces empty: such a stream reads the piece of a filled one (with its own seeded shuffle and crops), so
    every stream and world size still sees the same samples."""
    shards = [s for s in shards if s.count > 0]
    order = np.random.default_rng([seed, task, epoch]).permutation(len(shards)).tolist()
    pieces = plan_pieces([shards[i] for i in order], streams, cap)
    filled = [p for p in pieces if p]
    return [p if p else filled[s % len(filled)] for s, p in enumerate(pieces)]


def stream_count(streams: int, world_size: int, batch_size: int) -> int:
    """The number of train streams: ``streams`` when it is a multiple of ``world_size`` and divides the global
    batch, else ``world_size * gcd(batch_size, streams // world_size)`` (then the global batches depend on the
    world size; a warning says so)."""
    if streams <= 0:
        raise UserError(f"data.streams must be > 0 (got {streams})")
    if streams % world_size == 0 and (batch_size * world_size) % streams == 0:
        return streams
    fallback = world_size * math.gcd(batch_size, max(1, streams // world_size))
    log_warning(
        f"warning: data.streams={streams} does not split over {world_size} ranks x per-rank batch {batch_size}; "
        f"using {fallback} streams, so these batches differ from runs on another number of ranks"
    )
    return fallback


def train_steps_per_epoch(manifest: Manifest, task: int, global_batch: int) -> int:
    """ceil(train samples of ``task`` / ``global_batch``): the same on every rank (it reads only the manifest)."""
    if global_batch <= 0:
        raise UserError(f"the global batch size must be > 0 (got {global_batch})")
    n = manifest.num_samples("train", task)
    if n == 0:
        raise UserError(f"task {task} has no training samples in the shard set")
    return math.ceil(n / global_batch)
