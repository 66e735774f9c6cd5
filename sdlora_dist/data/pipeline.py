"""Per-task streaming from shards anywhere: exact, deterministic train epochs and exactly-once evaluation.

Shards are read as forward-only streams (no seeking) through ``webdataset.gopen`` and webdataset's tar iterators
(``tar_file_expander`` -> ``group_by_keys``) from a folder or any URL ``urls`` lists. Exactness comes from the
manifest's per-shard counts, not from seeking. Why not ``webdataset.WebDataset`` + ``split_by_node`` +
``with_epoch``: its worker split hands whole shards to (rank, worker) pairs, so with uneven shards the ranks get
different sample counts (``with_epoch`` then repeats or cuts at a point that depends on the split), and its shuffle
buffer interleaves whatever the workers return first. Planning from the counts gives what it cannot:

* Train, epoch e of task t, global batch G = ``batch_size * world_size``, ``steps = ceil(N / G)``. The task's
  shards (``manifest.task_shards``: the one place that says which shards a task reads), permuted with
  ``(seed, t, e)``, are cut into S contiguous *streams* (``streams``, default 8) of near-equal length; a cut snaps
  to a shard boundary when that keeps the pieces balanced (within half a piece) and no longer than
  ``T = steps * G / S`` samples, else it falls inside a shard: the later stream skips that shard's prefix, reading
  only its tar headers from a local file or cached copy, and reading and dropping it from a remote stream (the only
  bytes read twice). Every stream reads its piece in order through a shuffle buffer seeded by
  ``(seed, t, e, stream)``, then fills up to exactly T samples by drawing again from the last samples it emitted
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
  one instead, so batches stay full and stay a function of (seed, t, e). A remote read that fails mid-shard is
  re-opened up to ``urls.RETRIES`` times with backoff, resuming after the last sample it got; then a UserError
  names the shard and URL (``bad_shard="error"``) or its missing samples are counted as corrupt (``"skip"``).
  Local shards are checked for existence and size first (no hashing).
* ``cache_dir``: a remote shard is downloaded once to ``cache_dir/<sha256>.tar`` (streamed, its sha256 checked
  against the manifest, atomically renamed) and read from there; later epochs and runs reuse it.

The pipeline stages, in order (``_TrainShards.__iter__`` / ``_EvalShards.__iter__``): shard list -> cut into
streams by rank and worker -> read tar samples -> shuffle -> decode with a counting error handler -> transform ->
batch (-> join the workers' parts).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import webdataset.tariterators as wds_tar
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdlora_dist.config import ShardPolicy
from sdlora_dist.data import urls
from sdlora_dist.data.images import open_rgb
from sdlora_dist.data.manifest import Manifest, ShardInfo, load_manifest, shard_problem
from sdlora_dist.errors import UserError
from sdlora_dist.logs import log_rank_zero

POLICIES = get_args(ShardPolicy)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
INTERPOLATIONS: dict[str, int] = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
_MAX_KEYS_KEPT = 100


@dataclass
class TransformSpec:
    """Preprocessing from the model's pretrained config (the caller fills it; 'normalize: none' = mean 0, std 1)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    train_scale: tuple[float, float] = (0.05, 1.0)
    hflip: float = 0.5
    train_interpolation: str | None = None  # the train crop's resize; None = ``interpolation``

    def resample(self, train: bool = False) -> int:
        """PIL resampling filter for ``interpolation`` (``train_interpolation`` for the train crop when set)."""
        name = self.train_interpolation if train and self.train_interpolation else self.interpolation
        if name not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {name!r}: valid are {', '.join(INTERPOLATIONS)}")
        return INTERPOLATIONS[name]


@dataclass
class LoaderStats:
    """What a loader skipped, summed over its workers; read it after the loop and report it."""

    samples: int = 0  # samples decoded and yielded
    corrupt: int = 0  # samples that could not be decoded (skipped)
    corrupt_keys: list[str] = field(default_factory=list)  # the first few of them, "shard:key"
    refilled: int = 0  # train slots refilled with another sample of the same batch
    bad_shards: list[str] = field(default_factory=list)  # shards left out under bad_shard="skip"

    def add(self, delta: dict[str, Any]) -> None:
        """Merge a worker's delta."""
        self.samples += delta["samples"]
        self.corrupt += delta["corrupt"]
        self.refilled += delta["refilled"]
        self.corrupt_keys += delta["corrupt_keys"][: max(0, _MAX_KEYS_KEPT - len(self.corrupt_keys))]
        self.bad_shards += [s for s in delta["bad_shards"] if s not in self.bad_shards]

    def summary(self) -> str:
        """One line for the log."""
        text = f"{self.samples} samples, {self.corrupt} corrupt skipped"
        if self.corrupt_keys:
            text += f" (e.g. {', '.join(self.corrupt_keys[:3])})"
        if self.bad_shards:
            text += f", {len(self.bad_shards)} bad shard(s) skipped: {', '.join(self.bad_shards)}"
        return text


def _new_delta() -> dict[str, Any]:
    return {"samples": 0, "corrupt": 0, "corrupt_keys": [], "refilled": 0, "bad_shards": []}


# --------------------------------------------------------------------------------------------------------------------
# Transforms (timm-style, driven by a per-sample RNG so augmentation does not depend on worker scheduling)


def sample_rng(*parts: object) -> random.Random:
    """A private RNG seeded by a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm: 10 tries, ratio 3/4..4/3, else a clamped center crop)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W); batches are stacked in uint8 and normalised once."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # HWC -> CHW


def normalize_batch(x: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std``, as one fused multiply-add over the batch."""
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))


def train_crop(img: Image.Image, spec: TransformSpec, rng: random.Random) -> Image.Image:
    """RandomResizedCrop(img_size, scale) + horizontal flip, as one PIL resize of the crop box."""
    box = _crop_box(img.width, img.height, spec.train_scale, rng)
    out = img.resize((spec.img_size, spec.img_size), spec.resample(train=True), box=box)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < spec.hflip else out


def eval_crop(img: Image.Image, spec: TransformSpec) -> Image.Image:
    """timm eval geometry: resize the short side to floor(img_size / crop_pct), center crop img_size."""
    scale_size = math.floor(spec.img_size / spec.crop_pct)
    w, h = img.size
    size = (scale_size, int(scale_size * h / w)) if w <= h else (int(scale_size * w / h), scale_size)
    out = img.resize(size, spec.resample())
    top = int(round((size[1] - spec.img_size) / 2.0))
    left = int(round((size[0] - spec.img_size) / 2.0))
    return out.crop((left, top, left + spec.img_size, top + spec.img_size))


def train_transform(img: Image.Image, spec: TransformSpec, rng: random.Random) -> torch.Tensor:
    """timm-style train transform of one image: crop, flip, to float CHW, normalise."""
    return normalize_batch(to_uint8_chw(train_crop(img, spec, rng))[None], spec)[0]


def eval_transform(img: Image.Image, spec: TransformSpec) -> torch.Tensor:
    """timm eval transform of one image: resize, center crop, to float CHW, normalise."""
    return normalize_batch(to_uint8_chw(eval_crop(img, spec))[None], spec)[0]


# --------------------------------------------------------------------------------------------------------------------
# Reading shards: forward-only streams through webdataset's opener and tar iterators


class ShardError(Exception):
    """A shard could not be read to the count the manifest gives (truncated, corrupt, missing, connection cut)."""


@dataclass
class _Item:
    """A sample read from a shard (``files``) or why it could not be (``error``)."""

    position: int
    shard: str
    key: str
    files: dict[str, bytes] | None
    error: str | None = None


@dataclass(frozen=True)
class _Segment:
    """Samples ``[first, stop)`` of one shard, read by one stream (``first > 0``: the prefix is read and dropped)."""

    shard: ShardInfo
    first: int
    stop: int


def _tar_samples(url: str, first: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one tar from sample ``first`` on, in order: ``webdataset.gopen`` -> ``tar_file_expander`` ->
    ``group_by_keys``. A local file (or a cached copy) skips the samples before ``first`` by reading their tar
    headers only; a remote stream reads them and drops them."""
    stream = urls.open_stream(url)
    try:
        if first and urls.is_local(url):
            # headers through the unbuffered file: a buffered one would read a whole buffer after every seek
            stream.seek(_sample_offset(getattr(stream, "raw", stream), first))
            first = 0
        files = wds_tar.tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        yield from itertools.islice(wds_tar.group_by_keys(files), first, None)
    finally:
        try:
            stream.close()
        except OSError:  # a pipe stopped early exits on SIGPIPE; read errors already surfaced in read()
            pass


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: names that belong to no sample


def _sample_offset(stream: Any, first: int) -> int:
    """Byte offset of the header that starts sample ``first`` of a seekable tar (webdataset's grouping: a sample is
    a run of regular members with one ``base_plus_ext`` key). tarfile's seekable mode reads each header and seeks
    over the member's data, so the samples before ``first`` cost their headers only."""
    tar = tarfile.open(fileobj=stream, mode="r:")
    key, count = None, 0
    while (member := tar.next()) is not None:
        if not member.isreg() or _META.match(member.name):
            continue
        prefix = wds_tar.base_plus_ext(member.name)[0]
        if prefix is not None and prefix != key:
            if count == first:
                return member.offset
            key, count = prefix, count + 1
    raise ShardError(f"ends after {count} samples, fewer than the {first + 1} the manifest promises")


class _ShardSource:
    """Where the shards are read from: the location, the optional local cache, the bad-shard policy."""

    def __init__(self, location: str | Path, cache_dir: str | Path | None, bad_shard: str) -> None:
        self.location, self.bad_shard = str(location), bad_shard
        self.cache_dir = None if cache_dir is None or urls.is_local(location) else Path(cache_dir)

    def url(self, shard: ShardInfo) -> str:
        """The URL (or path) the shard is streamed from: the cached copy when the cache is on."""
        remote = urls.join(self.location, shard.path)
        return remote if self.cache_dir is None else str(self._cached(remote, shard))

    def _cached(self, remote: str, shard: ShardInfo) -> Path:
        """``cache_dir/<sha256>.tar``, downloaded once (streamed, hashed, atomically renamed) and checked."""
        path = self.cache_dir / f"{shard.sha256}.tar"
        if path.is_file() and path.stat().st_size == shard.bytes:
            return path  # written only after its sha256 matched (below); a size change means it was altered
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{shard.sha256[:16]}.", suffix=".part")
        os.close(fd)
        try:
            digest = urls.with_retries(remote, lambda: _download(remote, Path(tmp)), "download")
            if digest != shard.sha256:
                raise UserError(
                    f"shard {remote} does not match the manifest's sha256 (got {digest[:12]}..., expected "
                    f"{shard.sha256[:12]}...); re-upload the shard set or fix its manifest.json"
                )
            umask = os.umask(0o022)  # mkstemp files are 0600: give the cache the permissions of a normal file
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def segment_items(self, seg: _Segment, position: int) -> Iterator[_Item]:
        """The samples of ``seg`` in order; a failed remote read is re-opened (bounded, with backoff) and resumes
        after the last sample it yielded; then the shard is named (``bad_shard='error'``) or its missing samples
        come back as error items (``'skip'``), so the stream keeps its length."""
        url = self.url(seg.shard)
        done, failures = 0, 0
        while True:
            try:
                yield from self._read(url, seg, done, position)
                return
            except _Progress as progress:
                done, reason = progress.done, progress.reason
            failures += 1
            if urls.is_local(url) or failures > urls.RETRIES:
                break
            time.sleep(urls.BACKOFF_S * 2 ** (failures - 1))
        tries = "" if urls.is_local(url) else f" after {failures} attempt(s)"
        if self.bad_shard == "error":
            raise UserError(
                f"shard {seg.shard.path} is unreadable{tries} ({reason}) at {url}; re-create it with 'sdlora data "
                "prepare' or pass bad_shard='skip' (data.bad_shard: skip) to leave it out"
            )
        for index in range(seg.first + done, seg.stop):
            yield _Item(position + done, seg.shard.path, f"#{index}", None, f"bad shard: {reason}")
            done += 1

    @staticmethod
    def _read(url: str, seg: _Segment, done: int, position: int) -> Iterator[_Item]:
        start = seg.first + done
        index = start - 1
        try:
            for index, sample in enumerate(_tar_samples(url, start), start=start):
                if index >= seg.stop:
                    return
                files = {k: v for k, v in sample.items() if not k.startswith("__")}
                yield _Item(position + done, seg.shard.path, sample["__key__"], files)
                done += 1
            if index + 1 < seg.stop:
                raise ShardError(f"ends after {index + 1} samples, the manifest says {seg.shard.count}")
        except (ShardError, tarfile.TarError, *urls.REMOTE_ERRORS) as exc:
            raise _Progress(done, f"{type(exc).__name__}: {urls.first_line(exc)}") from exc


class _Progress(Exception):
    """A read stopped after ``done`` samples of a segment, for ``reason``."""

    def __init__(self, done: int, reason: str) -> None:
        super().__init__(reason)
        self.done, self.reason = done, reason


def _download(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest``; returns its sha256."""
    digest = hashlib.sha256()
    stream = urls.open_stream(url)
    try:
        with open(dest, "wb") as out:
            while block := stream.read(1 << 20):
                digest.update(block)
                out.write(block)
    finally:
        stream.close()
    return digest.hexdigest()


def _decode(item: _Item, delta: dict[str, Any], corrupt: str) -> tuple[Image.Image, int] | None:
    """Decode one sample; a corrupt one is counted and skipped (or raises under ``corrupt='error'``)."""
    reason = item.error
    if reason is None:
        try:
            ext = next(e for e in IMAGE_EXTS if e in item.files)
            label = int(item.files["cls"])
            return open_rgb(item.files[ext]), label
        except (StopIteration, KeyError, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
    if corrupt == "error":
        raise UserError(f"corrupt sample {item.key} in shard {item.shard} ({reason}); pass corrupt='skip' to skip it")
    delta["corrupt"] += 1
    if len(delta["corrupt_keys"]) < _MAX_KEYS_KEPT:
        delta["corrupt_keys"].append(f"{item.shard}:{item.key}")
    return None


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _check_policy(name: str, value: str) -> None:
    if value not in POLICIES:
        raise UserError(f"{name} must be one of {', '.join(POLICIES)} (got {value!r})")


def _usable_shards(location: str, shards: list[ShardInfo], bad_shard: str, bad: list[str]) -> list[ShardInfo]:
    """Existence and size of every local shard (no hashing); bad ones raise or are listed in ``bad`` and left out."""
    usable = []
    for shard in shards:
        problem = shard_problem(location, shard)
        if problem is None:
            usable.append(shard)
            continue
        if bad_shard == "error":
            raise UserError(
                f"shard {shard.path} is unreadable ({problem}) at {urls.join(location, shard.path)}; re-create it "
                "with 'sdlora data prepare' or pass bad_shard='skip' (data.bad_shard: skip) to leave it out"
            )
        bad.append(shard.path)
        log_rank_zero(f"warning: skipping shard {shard.path} ({problem}) under bad_shard='skip'")
    return usable


# --------------------------------------------------------------------------------------------------------------------
# Planning from the manifest's counts


def cut_pieces(counts: list[int], pieces: int, cap: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Cut shards (in order, with ``counts``) into ``pieces`` contiguous runs of near-equal length.

    Returns per piece its ``(shard index, first, stop)`` runs. Cut k aims at ``k * N / pieces`` and snaps to the
    nearest shard boundary within half a piece, so most pieces are whole shards (read once). ``cap`` bounds every
    piece (train: the samples a stream emits per epoch); a cut that cannot snap inside the bounds falls inside a
    shard, whose prefix the later piece skips (``_tar_samples``).
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


def _plan(shards: list[ShardInfo], pieces: int, cap: int | None) -> list[list[_Segment]]:
    """``cut_pieces`` as segments of ``shards``."""
    return [
        [_Segment(shards[i], a, b) for i, a, b in piece]
        for piece in cut_pieces([s.count for s in shards], pieces, cap)
    ]


def stream_count(streams: int, world_size: int, batch_size: int) -> int:
    """The number of train streams: ``streams`` when it is a multiple of ``world_size`` and divides the global
    batch, else ``world_size * gcd(batch_size, streams // world_size)`` (then the global batches depend on the
    world size; a warning says so)."""
    if streams <= 0:
        raise UserError(f"data.streams must be > 0 (got {streams})")
    if streams % world_size == 0 and (batch_size * world_size) % streams == 0:
        return streams
    fallback = world_size * math.gcd(batch_size, max(1, streams // world_size))
    log_rank_zero(
        f"warning: data.streams={streams} does not split over {world_size} ranks x per-rank batch {batch_size}; "
        f"using {fallback} streams, so these batches differ from runs on another number of ranks"
    )
    return fallback


# --------------------------------------------------------------------------------------------------------------------
# Train


class _TrainShards(IterableDataset):
    """One rank's epoch of one task: its streams' chunks of every global step (see the module docstring)."""

    def __init__(self, source: _ShardSource, shards: list[ShardInfo], *, task: int, epoch: int, seed: int,
                 rank: int, world_size: int, batch_size: int, steps: int, streams: int, spec: TransformSpec,
                 corrupt: str, shuffle_buffer: int) -> None:  # fmt: skip
        super().__init__()
        self.source, self.spec, self.corrupt = source, spec, corrupt
        self.task, self.epoch, self.seed, self.rank, self.steps = task, epoch, seed, rank, steps
        self.chunk = batch_size * world_size // streams  # samples per stream per global step
        self.buffer = max(1, shuffle_buffer // streams)
        per_rank = streams // world_size
        self.rank_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        shards = [s for s in shards if s.count > 0]
        order = np.random.default_rng([seed, task, epoch]).permutation(len(shards)).tolist()
        pieces = _plan([shards[i] for i in order], streams, steps * self.chunk)
        # a task with fewer samples than streams leaves pieces empty: such a stream reads the piece of a filled one
        # (its own seeded shuffle and crops), so every stream and world size still sees the same samples
        filled = [p for p in pieces if p]
        self.pieces = [p if p else filled[s % len(filled)] for s, p in enumerate(pieces)]

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        mine = self.rank_streams[worker::num_workers]
        delta = _new_delta()
        gens = {s: self._stream(s, delta) for s in mine}
        for _ in range(self.steps):
            images, labels, keys, owners = [], [], [], []
            for s in mine:
                for _ in range(self.chunk):
                    image, label, key = next(gens[s])
                    images.append(image), labels.append(label), keys.append(key), owners.append(s)
            delta["samples"] += len(images)
            batch = normalize_batch(torch.stack(images), self.spec)
            yield batch, torch.tensor(labels, dtype=torch.int64), keys, torch.tensor(owners), dict(delta)
            delta.update(_new_delta())

    def _stream(self, s: int, delta: dict[str, Any]) -> Iterator[tuple[torch.Tensor, int, str]]:
        """Stream ``s``: its piece read in order through a seeded shuffle buffer, then refills drawn from the last
        samples it emitted, ``steps * chunk`` samples in all; corrupt samples are skipped (counted) and replaced."""
        rng = random.Random(int.from_bytes(hashlib.blake2b(f"{self.seed}/{self.task}/{self.epoch}/{s}".encode(),
                                                           digest_size=8).digest(), "little"))  # fmt: skip
        recent: list[_Item] = []
        emitted = 0
        for item in self._shuffled(s, rng):
            decoded = _decode(item, delta, self.corrupt)
            if decoded is None:
                delta["refilled"] += 1
                continue
            recent = (recent + [item])[-self.buffer :]
            yield self._transform(s, emitted, item, decoded)
            emitted += 1
            if emitted == self.steps * self.chunk:
                return
        if not recent:
            raise UserError(
                f"task {self.task} epoch {self.epoch}: stream {s} on rank {self.rank} has no readable sample; "
                "check the shards with 'sdlora data inspect --verify'"
            )
        while emitted < self.steps * self.chunk:  # the piece is shorter than the stream: refill from the buffer
            item = recent[rng.randrange(len(recent))]
            yield self._transform(s, emitted, item, _decode(item, delta, self.corrupt))
            emitted += 1

    def _shuffled(self, s: int, rng: random.Random) -> Iterator[_Item]:
        """The piece's samples through a shuffle buffer of ``self.buffer`` items (webdataset's algorithm, seeded)."""
        pool: list[_Item] = []
        position = 0
        for seg in self.pieces[s]:
            for item in self.source.segment_items(seg, position):
                position += 1
                pool.append(item)
                if len(pool) >= self.buffer:
                    yield pool.pop(rng.randrange(len(pool)))
        while pool:
            yield pool.pop(rng.randrange(len(pool)))

    def _transform(self, s: int, index: int, item: _Item, decoded: tuple[Image.Image, int]) -> tuple:
        rng = sample_rng(self.seed, self.task, self.epoch, s, index, item.key)
        return to_uint8_chw(train_crop(decoded[0], self.spec, rng)), decoded[1], item.key


# --------------------------------------------------------------------------------------------------------------------
# Eval


class _EvalShards(IterableDataset):
    """One (rank, worker)'s contiguous piece of the requested tasks' test samples, each read exactly once."""

    def __init__(self, source: _ShardSource, shards: list[ShardInfo], *, rank: int, world_size: int, batch_size: int,
                 workers: int, spec: TransformSpec, corrupt: str) -> None:  # fmt: skip
        super().__init__()
        self.source, self.spec, self.corrupt, self.batch_size = source, spec, corrupt, batch_size
        self.rank, self.workers = rank, max(1, workers)
        self.pieces = _plan([s for s in shards if s.count > 0], world_size * self.workers, None)

    def __iter__(self) -> Iterator[tuple]:
        worker, _ = _worker()
        items = (
            it for seg in self.pieces[self.rank * self.workers + worker] for it in self.source.segment_items(seg, 0)
        )
        while True:
            chunk = list(itertools.islice(items, self.batch_size))
            if not chunk:
                return
            delta = _new_delta()
            images, labels, keys = [], [], []
            for item in chunk:
                decoded = _decode(item, delta, self.corrupt)
                if decoded is not None:
                    images.append(to_uint8_chw(eval_crop(decoded[0], self.spec))), labels.append(decoded[1])
                    keys.append(item.key)
            delta["samples"] += len(images)
            batch = normalize_batch(torch.stack(images), self.spec) if images else None
            yield batch, torch.tensor(labels, dtype=torch.int64), keys, None, delta


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
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        parts_per_batch = max(1, self.num_workers) if self.length is not None else 1
        try:
            parts = []
            for part in loader:
                self.stats.add(part[4])
                parts.append(part)
                if len(parts) == parts_per_batch:
                    batch = _join_parts(parts)
                    parts = []
                    if batch[0] is not None:
                        if self.label_map is not None:
                            batch = (batch[0], self.label_map[batch[1]], batch[2])
                        yield batch if self.with_keys else batch[:2]
        except UserError as exc:  # re-raised from a worker with its traceback in the text: keep the message line
            text = str(exc)
            if "Original Traceback" in text:
                last = [ln for ln in text.splitlines() if ln.strip()][-1]
                raise UserError(last.split("UserError: ", 1)[-1]) from None
            raise


def _join_parts(parts: list[tuple]) -> tuple:
    """One batch from the workers' parts of a step, in stream order (eval: the single part as it is)."""
    if len(parts) == 1:
        return parts[0][0], parts[0][1], parts[0][2]
    owners = torch.cat([p[3] for p in parts])
    order = torch.argsort(owners, stable=True)
    keys = [k for p in parts for k in p[2]]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return images[order], labels[order], [keys[i] for i in order.tolist()]


def train_steps_per_epoch(manifest: Manifest, task: int, global_batch: int) -> int:
    """ceil(train samples of ``task`` / ``global_batch``): the same on every rank (it reads only the manifest)."""
    if global_batch <= 0:
        raise UserError(f"the global batch size must be > 0 (got {global_batch})")
    n = manifest.num_samples("train", task)
    if n == 0:
        raise UserError(f"task {task} has no training samples in the shard set")
    return math.ceil(n / global_batch)


def _check_args(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    if batch_size <= 0:
        raise UserError(f"batch_size must be > 0 (got {batch_size})")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0 (got {num_workers})")


def make_train_loader(
    shards_dir: str | Path,
    task: int,
    *,
    spec: TransformSpec,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    steps_per_epoch: int | None = None,
    corrupt: str = "skip",
    bad_shard: str = "error",
    shuffle_buffer: int = 2048,
    streams: int = 8,
    cache_dir: str | Path | None = None,
    with_keys: bool = False,
    manifest: Manifest | None = None,
) -> ShardLoader:
    """One epoch of ``task`` for this rank: exactly ``steps_per_epoch`` batches of ``batch_size`` (per rank).

    ``shards_dir`` is a folder or URL (``urls``). Reads only the task's train shards. Global step i holds the same
    samples on any number of ranks that divides ``streams`` (rank r holds its slice), deterministic in (seed, task,
    epoch) whatever ``num_workers``. Labels are global (int64); images NCHW float, normalised with ``spec``.
    ``manifest``: the run's view (``data.classes.task_view``: its class order and split); default the shard set's own.
    """
    _check_policy("corrupt", corrupt), _check_policy("bad_shard", bad_shard), spec.resample(train=True)
    _check_args(rank, world_size, batch_size, num_workers)
    manifest = manifest or load_manifest(shards_dir)
    steps = steps_per_epoch or train_steps_per_epoch(manifest, task, batch_size * world_size)
    stats = LoaderStats()
    shards = _usable_shards(str(shards_dir), manifest.task_shards("train", task), bad_shard, stats.bad_shards)
    if not any(s.count for s in shards):
        raise UserError(f"task {task}: no readable train shard left in {shards_dir}")
    n_streams = stream_count(streams, world_size, batch_size)
    dataset = _TrainShards(
        _ShardSource(shards_dir, cache_dir, bad_shard), shards, task=task, epoch=epoch, seed=seed, rank=rank,
        world_size=world_size, batch_size=batch_size, steps=steps, streams=n_streams, spec=spec, corrupt=corrupt,
        shuffle_buffer=shuffle_buffer,
    )  # fmt: skip
    workers = min(num_workers, len(dataset.rank_streams))
    return ShardLoader(dataset, num_workers=workers, length=steps, with_keys=with_keys, stats=stats,
                       label_map=manifest.label_map)  # fmt: skip


def make_eval_loader(
    shards_dir: str | Path,
    tasks: list[int],
    *,
    spec: TransformSpec,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    corrupt: str = "skip",
    bad_shard: str = "error",
    cache_dir: str | Path | None = None,
    with_keys: bool = False,
    split: str = "test",
    manifest: Manifest | None = None,
) -> ShardLoader:
    """The ``split`` samples of ``tasks``, each exactly once across all ranks and workers (no padding).

    Ranks may get different batch counts (sum the counts with an all-reduce); the last batch may be short.
    ``manifest``: the run's view (class order and split), default the shard set's own.
    """
    _check_policy("corrupt", corrupt), _check_policy("bad_shard", bad_shard), spec.resample()
    _check_args(rank, world_size, batch_size, num_workers)
    manifest = manifest or load_manifest(shards_dir)
    stats = LoaderStats()
    shards = [s for t in tasks for s in manifest.task_shards(split, t)]  # split="train": head_align's stats pass
    shards = _usable_shards(str(shards_dir), shards, bad_shard, stats.bad_shards)
    dataset = _EvalShards(
        _ShardSource(shards_dir, cache_dir, bad_shard), shards, rank=rank, world_size=world_size,
        batch_size=batch_size, workers=num_workers, spec=spec, corrupt=corrupt,
    )  # fmt: skip
    return ShardLoader(dataset, num_workers=num_workers, length=None, with_keys=with_keys, stats=stats,
                       label_map=manifest.label_map)  # fmt: skip
