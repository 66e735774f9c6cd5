"""Per-task streaming from shards anywhere: exact, deterministic train epochs and exactly-once evaluation.

Exactness comes from the manifest's per-shard counts (``planning``), not from seeking. Why not
``webdataset.WebDataset`` + ``split_by_node`` + ``with_epoch``: its worker split hands whole shards to (rank, worker)
pairs, so with uneven shards the ranks get different sample counts (``with_epoch`` then repeats or cuts at a point
that depends on the split), and its shuffle buffer interleaves whatever the workers return first. Planning from the
counts gives what it cannot:

* Train, epoch e of task t, global batch G = ``batch_size * world_size``, ``steps = ceil(N / G)``. The task's
  shards (``manifest.task_shards``: the one place that says which shards a task reads), permuted with
  ``(seed, t, e)``, are cut into S contiguous *streams* (``streams``, default 8) of near-equal length; a cut snaps
  to a shard boundary when that keeps the pieces balanced (within half a piece) and no longer than
  ``T = steps * G / S`` samples, else it falls inside a shard: the later stream opens that shard at its first
  sample from the manifest's per-sample byte offsets (a seek, an HTTP ``Range`` or S3 ranged GET:
  ``byteranges``), so no byte is read twice; a shard set without offsets, a ``pipe:`` URL or a server ignoring
  Range skips the prefix instead (its tar headers from a local file, the whole prefix from a remote stream).
  Every stream reads its piece in order through a shuffle buffer seeded by ``(seed, t, e, stream)``, then fills
  up to exactly T samples by drawing again from the last samples it emitted
  (no byte is re-read). Global step i is the concatenation over streams of each stream's i-th chunk of G / S
  samples, so it is a function of (seed, t, e) only. Rank r owns streams ``[r*S/W, (r+1)*S/W)`` and yields
  exactly ``steps`` batches of G / W samples: equal step counts on every rank whatever the shard sizes, and the
  same samples in global step i on 1, 2, 4 or 8 ranks (every world size dividing S; S must divide G). A world size
  that does not divide S falls back to another S, with a warning that the batches then depend on the world size.
  Within a rank, DataLoader worker w reads streams ``w, w + n, ...`` of the rank's streams and yields its part of
  every step; the loader joins the parts of a step (the DataLoader returns them round-robin) in stream order, so a
  batch is the same whatever ``num_workers`` is (at most S/W workers are used). Each sample's crop and flip come
  from an RNG seeded by ``(seed, t, e, stream, index, key)``. A task with fewer samples than S leaves some pieces
  empty; stream s then reads the piece of filled stream ``s mod (filled streams)`` again (bytes read twice).
  What differs with the world size: nothing in the samples or their augmentation; the float reduction order of the
  gradient all-reduce does. What differs from a global shuffle: a global batch mixes S streams, each of which
  mixes only within its shuffle buffer (``shuffle_buffer / S`` samples) and reads its shards in order.
* Eval: the requested tasks' test shards in manifest order are cut into ``world_size * max(1, num_workers)``
  pieces (snapped to shard boundaries within half a piece); (rank r, worker w) reads piece ``r * workers + w``.
  Each sample is read exactly once; ranks may differ in batch count (sum the counts with an all-reduce).
* A sample that cannot be decoded is skipped and counted (``loader.stats``); in train its stream draws the next
  one instead, so batches stay full and stay a function of (seed, t, e). Failed reads and the cache: ``reading``.
* A ``UserError`` in a DataLoader worker crosses back as a ``WorkerFailure`` record (kind + message), which the
  loader raises again as the same type with the same message.

The stages, in order, are the literal lists in ``_TrainShards.__iter__`` and ``_EvalShards.__iter__``: shard list
-> cut into streams by rank and worker -> read tar samples -> shuffle -> decode with a counting error handler ->
transform -> batch (-> join the workers' parts).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdlora_dist.config import DataConfig
from sdlora_dist.data.manifest import Manifest, ShardInfo, load_manifest
from sdlora_dist.data.planning import plan_pieces, stream_count, train_steps_per_epoch, train_streams
from sdlora_dist.data.reading import (
    Item,
    LoaderStats,
    ShardSource,
    check_policy,
    decode,
    new_delta,
    repair_advice,
    usable_shards,
)
from sdlora_dist.data.transforms import TransformSpec, eval_crop, normalize_batch, sample_rng, to_uint8_chw, train_crop
from sdlora_dist.errors import ServerUnreachable, UserError
from sdlora_dist.jobs.slurm import local_world_size

Stage = Callable[[Iterator[Any]], Iterator[Any]]


def run_stages(stages: list[Stage]) -> Iterator[Any]:
    """Chain ``stages``: each takes the previous one's iterator (the first gets an empty one: it is the source)."""
    data: Iterator[Any] = iter(())
    for stage in stages:
        data = stage(data)
    return data


# --------------------------------------------------------------------------------------------------------------------
# Errors across the worker boundary, by type


@dataclass(frozen=True)
class WorkerFailure:
    """An error a loader worker hit, carried to the main process as a record: its kind and its exact message."""

    kind: str
    message: str


FAILURE_KINDS: dict[str, type[Exception]] = {"user": UserError, "network": ServerUnreachable}


def carry_errors(parts: Iterator[Any]) -> Iterator[Any]:
    """The last stage of a worker: a UserError ends the worker's parts with a ``WorkerFailure`` record (torch would
    re-raise it in the main process with the worker's traceback folded into the message)."""
    try:
        yield from parts
    except UserError as exc:
        yield WorkerFailure("network" if isinstance(exc, ServerUnreachable) else "user", str(exc))


def _ignore_sigterm(worker_id: int) -> None:
    """A scheduler's SIGTERM reaches every process of the job: a loader worker leaves it to its rank, which
    finishes its step and checkpoints first (jobs.preempt); the worker exits with the rank."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------------------------------------------------
# Stages


def shuffled(items: Iterator[Item], rng: random.Random, size: int) -> Iterator[Item]:
    """Items through a shuffle buffer of ``size`` items (webdataset's algorithm, seeded by ``rng``)."""
    pool: list[Item] = []
    for item in items:
        pool.append(item)
        if len(pool) >= size:
            yield pool.pop(rng.randrange(len(pool)))
    while pool:
        yield pool.pop(rng.randrange(len(pool)))


def decoded(items: Iterator[Item], delta: dict[str, Any], corrupt: str, refill: bool) -> Iterator[tuple]:
    """``(item, (image, label))`` of every item that decodes; the others are counted in ``delta`` and skipped
    (``refill``: a train stream fills their slots with later samples, counted as refilled)."""
    for item in items:
        sample = decode(item, delta, corrupt)
        if sample is None:
            delta["refilled"] += refill
            continue
        yield item, sample


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last one shorter)."""
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# --------------------------------------------------------------------------------------------------------------------
# Train


class _TrainShards(IterableDataset):
    """One rank's epoch of one task: its streams' chunks of every global step (see the module docstring)."""

    def __init__(self, source: ShardSource, shards: list[ShardInfo], *, task: int, epoch: int, seed: int,
                 rank: int, world_size: int, batch_size: int, steps: int, streams: int, spec: TransformSpec,
                 corrupt: str, shuffle_buffer: int) -> None:  # fmt: skip
        super().__init__()
        self.source, self.spec, self.corrupt = source, spec, corrupt
        self.task, self.epoch, self.seed, self.rank, self.steps = task, epoch, seed, rank, steps
        self.chunk = batch_size * world_size // streams  # samples per stream per global step
        self.total = steps * self.chunk  # samples per stream per epoch
        self.buffer = max(1, shuffle_buffer // streams)
        per_rank = streams // world_size
        self.rank_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.pieces = train_streams(shards, seed=seed, task=task, epoch=epoch, streams=streams, cap=self.total)

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _worker()
        delta = new_delta()
        streams = {}
        for s in self.rank_streams[worker::num_workers]:  # this rank's streams, then this worker's share of them
            rng = sample_rng(self.seed, self.task, self.epoch, s)  # shared by the shuffle and the refill, in order
            streams[s] = run_stages([
                lambda _, s=s: self.source.piece_items(self.pieces[s]),         # read the piece's tar samples
                partial(shuffled, rng=rng, size=self.buffer),                    # seeded shuffle buffer
                partial(decoded, delta=delta, corrupt=self.corrupt, refill=True),  # decode, count + skip corrupt
                partial(self._fill, s=s, rng=rng, delta=delta),                  # exactly `total` samples
                partial(self._augment, s=s),                                     # seeded crop + flip, uint8
            ])  # fmt: skip
        return carry_errors(self._steps(streams, delta))  # batch: every stream's chunk of each global step

    def _fill(self, samples: Iterator[tuple], s: int, rng: random.Random, delta: dict[str, Any]) -> Iterator[tuple]:
        """Exactly ``total`` samples: the stream's own, then refills drawn from the last ``buffer`` it emitted."""
        recent: list[Item] = []
        emitted = 0
        for item, sample in samples:
            recent = (recent + [item])[-self.buffer :]
            yield item, sample
            emitted += 1
            if emitted == self.total:
                return
        if not recent:
            raise UserError(
                f"task {self.task} epoch {self.epoch}: stream {s} on rank {self.rank} has no readable sample; "
                "check the shards with 'sdlora data inspect --verify'"
            )
        while emitted < self.total:  # the piece is shorter than the stream: refill from the buffer
            item = recent[rng.randrange(len(recent))]
            yield item, decode(item, delta, self.corrupt)
            emitted += 1

    def _augment(self, samples: Iterator[tuple], s: int) -> Iterator[tuple[torch.Tensor, int, str]]:
        for index, (item, (image, label)) in enumerate(samples):
            rng = sample_rng(self.seed, self.task, self.epoch, s, index, item.key)
            yield to_uint8_chw(train_crop(image, self.spec, rng)), label, item.key

    def _steps(self, streams: dict[int, Iterator[tuple]], delta: dict[str, Any]) -> Iterator[tuple]:
        """This worker's part of every global step: ``chunk`` samples of each of its streams, in stream order."""
        for _ in range(self.steps):
            images, labels, keys, owners = [], [], [], []
            for s, stream in streams.items():
                for image, label, key in itertools.islice(stream, self.chunk):
                    images.append(image), labels.append(label), keys.append(key), owners.append(s)
            delta["samples"] += len(images)
            batch = normalize_batch(torch.stack(images), self.spec)
            yield batch, torch.tensor(labels, dtype=torch.int64), keys, torch.tensor(owners), dict(delta)
            delta.update(new_delta())


# --------------------------------------------------------------------------------------------------------------------
# Eval


class _EvalShards(IterableDataset):
    """One (rank, worker)'s contiguous piece of the requested tasks' test samples, each read exactly once."""

    def __init__(self, source: ShardSource, shards: list[ShardInfo], *, rank: int, world_size: int, batch_size: int,
                 workers: int, spec: TransformSpec, corrupt: str) -> None:  # fmt: skip
        super().__init__()
        self.source, self.spec, self.corrupt, self.batch_size = source, spec, corrupt, batch_size
        self.rank, self.workers = rank, max(1, workers)
        self.pieces = plan_pieces(shards, world_size * self.workers, None)

    def __iter__(self) -> Iterator[Any]:
        worker, _ = _worker()
        piece = self.pieces[self.rank * self.workers + worker]  # cut by rank and worker
        return run_stages([
            lambda _: self.source.piece_items(piece),    # read the piece's tar samples, in order
            partial(chunks, size=self.batch_size),        # batches of read samples (no shuffle)
            partial(map, self._decode_batch),             # decode (count + skip corrupt), center crop, uint8
            carry_errors,                                 # a UserError crosses to the main process as a record
        ])  # fmt: skip

    def _decode_batch(self, items: list[Item]) -> tuple:
        delta = new_delta()
        images, labels, keys = [], [], []
        for item, (image, label) in decoded(iter(items), delta, self.corrupt, refill=False):
            images.append(to_uint8_chw(eval_crop(image, self.spec))), labels.append(label), keys.append(item.key)
        delta["samples"] += len(images)
        batch = normalize_batch(torch.stack(images), self.spec) if images else None
        return batch, torch.tensor(labels, dtype=torch.int64), keys, None, delta


# --------------------------------------------------------------------------------------------------------------------
# Public loaders


def _identity(item: Any) -> Any:
    return item


class ShardLoader:
    """An iterable of ``(images, labels)`` batches (``(images, labels, keys)`` with ``with_keys``) with ``stats``.

    ``stats`` (LoaderStats) sums what every worker skipped; read it after the loop. A train batch is assembled
    here from one part per worker (the DataLoader hands parts back round-robin), ordered by stream.
    """

    def __init__(self, dataset: IterableDataset, *, num_workers: int, length: int | None, with_keys: bool,
                 stats: LoaderStats, label_map: list[int] | None = None) -> None:  # fmt: skip
        self.dataset, self.num_workers, self.length, self.with_keys, self.stats = (
            dataset, num_workers, length, with_keys, stats,
        )  # fmt: skip
        # stored label -> global label of the run's class order (class-grouped shards store the class index)
        self.label_map = None if label_map is None else torch.tensor(label_map, dtype=torch.int64)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an eval loader has no fixed length: ranks and skipped samples change it")
        return self.length

    def __iter__(self) -> Iterator[tuple]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            worker_init_fn=_ignore_sigterm if self.num_workers else None)  # fmt: skip
        parts_per_batch = max(1, self.num_workers) if self.length is not None else 1
        parts = []
        for part in loader:
            if isinstance(part, WorkerFailure):
                raise FAILURE_KINDS[part.kind](part.message)
            self.stats.add(part[4])
            parts.append(part)
            if len(parts) < parts_per_batch:
                continue
            batch, parts = _join_parts(parts), []
            if batch[0] is None:
                continue
            if self.label_map is not None:
                batch = (batch[0], self.label_map[batch[1]], batch[2])
            yield batch if self.with_keys else batch[:2]


def _join_parts(parts: list[tuple]) -> tuple:
    """One batch from the workers' parts of a step, in stream order (eval: the single part as it is)."""
    if len(parts) == 1:
        return parts[0][0], parts[0][1], parts[0][2]
    owners = torch.cat([p[3] for p in parts])
    order = torch.argsort(owners, stable=True)
    keys = [k for p in parts for k in p[2]]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return images[order], labels[order], [keys[i] for i in order.tolist()]


def _check_ranks(rank: int, world_size: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def make_train_loader(
    data: DataConfig,
    task: int,
    *,
    spec: TransformSpec,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    steps_per_epoch: int | None = None,
    shuffle_buffer: int = 2048,
    with_keys: bool = False,
    manifest: Manifest | None = None,
) -> ShardLoader:
    """One epoch of ``task`` for this rank: exactly ``steps_per_epoch`` batches of ``data.batch_size / world_size``.

    Reads only the task's train shards of ``data.shards`` (a folder or URL, ``urls``), through ``data.num_workers``
    workers, ``data.streams`` streams, ``data.cache_dir`` and the ``data.corrupt`` / ``data.bad_shard`` policies.
    Global step i holds the same samples on any number of ranks that divides ``streams`` (rank r holds its slice),
    deterministic in (seed, task, epoch) whatever the workers. Labels are global (int64); images NCHW float,
    normalised with ``spec``. ``manifest``: the run's view (``data.classes.task_view``: its class order and split);
    default the shard set's own.
    """
    if data.shards is None:
        raise UserError("data.shards is not set: pass --set data.shards=DIR_OR_URL (written by 'sdlora data prepare')")
    _check_ranks(rank, world_size)
    if data.batch_size % world_size:
        raise UserError(f"data.batch_size={data.batch_size} must be divisible by the {world_size} ranks")
    spec.resample(train=True)
    batch_size = data.batch_size // world_size
    manifest = manifest or load_manifest(data.shards)
    steps = steps_per_epoch or train_steps_per_epoch(manifest, task, data.batch_size)
    stats = LoaderStats()
    advice = repair_advice(data.shards, manifest)
    shards = usable_shards(data.shards, manifest.task_shards("train", task), data.bad_shard, stats.bad_shards, advice)
    if not any(s.count for s in shards):
        raise UserError(f"task {task}: no readable train shard left in {data.shards}")
    dataset = _TrainShards(
        ShardSource(data.shards, data.cache_dir, data.bad_shard, advice), shards, task=task, epoch=epoch, seed=seed,
        rank=rank, world_size=world_size, batch_size=batch_size, steps=steps,
        streams=stream_count(data.streams, world_size, batch_size), spec=spec, corrupt=data.corrupt,
        shuffle_buffer=shuffle_buffer,
    )  # fmt: skip
    workers = min(workers_per_rank(data.num_workers), len(dataset.rank_streams))
    return ShardLoader(dataset, num_workers=workers, length=steps, with_keys=with_keys, stats=stats,
                       label_map=manifest.label_map)  # fmt: skip


MAX_DEFAULT_WORKERS = 4


def workers_per_rank(requested: int | None) -> int:
    """``data.num_workers``, or when null: the CPU cores this process may use, shared by the ranks on its node
    (``LOCAL_WORLD_SIZE`` or ``LOCAL_SIZE``), less one for the rank itself, at most 4 (more workers than cores only
    make torch warn).
    """
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, local_world_size(os.environ) or 1)
    return max(0, min(MAX_DEFAULT_WORKERS, cores // ranks_here - 1))


def make_eval_loader(
    shards_dir: str | Path,
    tasks: Iterable[int],
    *,
    spec: TransformSpec,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = 0,
    corrupt: str = "skip",
    bad_shard: str = "error",
    cache_dir: str | Path | None = None,
    with_keys: bool = False,
    split: str = "test",
    manifest: Manifest | None = None,
) -> ShardLoader:
    """The ``split`` samples of ``tasks``, each exactly once across all ranks and workers (no padding).

    Ranks may get different batch counts (sum the counts with an all-reduce); the last batch may be short.
    ``manifest``: the run's view (class order and split), default the shard set's own. ``num_workers`` None: as
    :func:`workers_per_rank`.
    """
    check_policy("corrupt", corrupt), check_policy("bad_shard", bad_shard), spec.resample()
    _check_ranks(rank, world_size)
    if batch_size <= 0:
        raise UserError(f"batch_size must be > 0 (got {batch_size})")
    num_workers = workers_per_rank(num_workers)  # None: from the cores per rank
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0 (got {num_workers})")
    manifest = manifest or load_manifest(shards_dir)
    stats = LoaderStats()
    shards = [s for t in tasks for s in manifest.task_shards(split, t)]  # split="train": head_align's stats pass
    advice = repair_advice(shards_dir, manifest)
    shards = usable_shards(str(shards_dir), shards, bad_shard, stats.bad_shards, advice)
    dataset = _EvalShards(
        ShardSource(shards_dir, cache_dir, bad_shard, advice), shards, rank=rank, world_size=world_size,
        batch_size=batch_size, workers=num_workers, spec=spec, corrupt=corrupt,
    )  # fmt: skip
    return ShardLoader(dataset, num_workers=num_workers, length=None, with_keys=with_keys, stats=stats,
                       label_map=manifest.label_map)  # fmt: skip
