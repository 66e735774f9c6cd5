"""Per-task streaming from shards: exact, deterministic train epochs and exactly-once evaluation, per rank and worker.

Why not ``webdataset.WebDataset`` + ``DataLoader`` here: its worker split hands whole shards to workers, so with
uneven shards ranks get different batch counts, and its shuffle buffer depends on worker scheduling. The shards
are WebDataset tars (a test reads them with ``webdataset``), but this module reads them with ``tarfile`` so that
the stream is a pure function of the arguments:

* Train, epoch e of task t: the task's shards, reshuffled per pass with ``(seed, t, e, pass)``, form an endless
  sample stream; rank r takes positions ``[r*L, (r+1)*L)`` with ``L = steps * batch_size``, so every rank yields
  exactly ``steps`` full batches whatever the shard sizes (the stream wraps into the next pass when the task has
  fewer samples than ``steps * global_batch``). Positions are permuted inside windows of ``shuffle_buffer``
  samples (seeded by the window's start), batch i of a rank is built by worker ``i % num_workers`` (the order the
  DataLoader hands batches back in), and each sample's crop and flip come from an RNG seeded by
  ``(seed, t, e, position, key)``. Same arguments -> same batches, whatever ``num_workers`` is.
* Eval: the requested tasks' test samples in manifest order are cut into ``world_size`` contiguous ranges; batch i
  of a rank goes to worker ``i % num_workers``. Each sample is read exactly once; ranks may differ by one batch.
* A sample that cannot be decoded is skipped and counted (``loader.stats``); in a train batch its slot is refilled
  with another sample of the same batch so the batch stays full. A missing or truncated shard raises UserError
  naming it (``bad_shard="error"``) or is left out of the stream and listed in ``loader.stats`` (``"skip"``).

The pipeline stages, in order (``_TrainShards.__iter__`` / ``_EvalShards.__iter__``): shard list -> split by rank
and worker -> read tar members -> decode with a counting error handler -> shuffle -> transform -> batch.
"""

from __future__ import annotations

import hashlib
import math
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdlora_dist.data.images import open_rgb
from sdlora_dist.data.manifest import Manifest, ShardInfo, load_manifest, shard_problem
from sdlora_dist.errors import UserError
from sdlora_dist.logs import log_rank_zero

POLICIES = ("skip", "error")
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
# Reading tar shards


class ShardError(Exception):
    """A shard file could not be read as a tar (truncated, corrupt, missing)."""


class _ShardReader:
    """Forward-only access to the samples of one shard by index; skipped members are seeked over, not read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")
            self._tar = tarfile.open(fileobj=self._fh, mode="r:")
            self._next = self._tar.next()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ShardError(f"{type(exc).__name__}: {exc}") from exc
        self._index = -1

    def get(self, index: int) -> tuple[str, dict[str, bytes]]:
        """The key and ``{ext: bytes}`` of sample ``index`` (must be > the previous index asked for)."""
        try:
            while True:
                if self._next is None:
                    raise ShardError(f"ends after {self._index + 1} samples, sample {index} was expected")
                key = _member_key(self._next)
                members = []
                while self._next is not None and _member_key(self._next) == key:
                    members.append(self._next)
                    self._next = self._tar.next()
                self._index += 1
                if self._index == index:
                    return key, {m.name.split(".", 1)[1]: self._read(m) for m in members if "." in m.name}
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ShardError(f"{type(exc).__name__}: {exc}") from exc

    def _read(self, member: tarfile.TarInfo) -> bytes:
        fh = self._tar.extractfile(member)
        data = fh.read() if fh is not None else b""
        if len(data) != member.size:
            raise ShardError(f"member {member.name} is cut short")
        return data

    def close(self) -> None:
        """Close the file."""
        self._tar.close()
        self._fh.close()


def _member_key(member: tarfile.TarInfo) -> str:
    return member.name.split(".", 1)[0]


Locate = Callable[[int], tuple[Any, ShardInfo, int]]  # position -> (reader group id, shard, sample index)


@dataclass
class _Item:
    """A sample read from a shard (``files``) or why it could not be (``error``)."""

    position: int
    shard: str
    key: str
    files: dict[str, bytes] | None
    error: str | None = None


def _read_positions(positions: Iterable[int], locate: Locate, root: Path, bad_shard: str) -> Iterator[_Item]:
    """Stream the samples at ascending ``positions``, opening each shard once per consecutive run of positions."""
    group, reader, broken = None, None, None
    try:
        for pos in positions:
            gid, shard, index = locate(pos)
            if gid != group:
                if reader is not None:
                    reader.close()
                group, reader, broken = gid, None, None
                try:
                    reader = _ShardReader(root / shard.path)
                except ShardError as exc:
                    broken = _shard_failure(shard, str(exc), bad_shard)
            if reader is not None and broken is None:
                try:
                    key, files = reader.get(index)
                    yield _Item(pos, shard.path, key, files)
                    continue
                except ShardError as exc:
                    broken = _shard_failure(shard, str(exc), bad_shard)
            yield _Item(pos, shard.path, f"#{index}", None, f"bad shard: {broken}")
    finally:
        if reader is not None:
            reader.close()


def _shard_failure(shard: ShardInfo, reason: str, bad_shard: str) -> str:
    if bad_shard == "error":
        raise UserError(
            f"shard {shard.path} is unreadable ({reason}); re-create it with 'sdlora data prepare' or pass "
            "bad_shard='skip' (data.bad_shard: skip) to leave it out"
        )
    return reason


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


def _usable_shards(root: Path, shards: list[ShardInfo], bad_shard: str, bad: list[str]) -> list[ShardInfo]:
    """Existence and size of every shard (no hashing); bad ones raise or are listed in ``bad`` and left out."""
    usable = []
    for shard in shards:
        problem = shard_problem(root, shard)
        if problem is None:
            usable.append(shard)
            continue
        _shard_failure(shard, problem, bad_shard)
        bad.append(shard.path)
        log_rank_zero(f"warning: skipping shard {shard.path} ({problem}) under bad_shard='skip'")
    return usable


# --------------------------------------------------------------------------------------------------------------------
# Train


class _TrainShards(IterableDataset):
    """One rank's epoch of one task: exactly ``steps`` full batches (see the module docstring)."""

    def __init__(self, root: Path, shards: list[ShardInfo], *, task: int, epoch: int, seed: int, rank: int,
                 world_size: int, batch_size: int, steps: int, spec: TransformSpec, corrupt: str, bad_shard: str,
                 shuffle_buffer: int) -> None:  # fmt: skip
        super().__init__()
        self.root, self.shards, self.spec = root, [s for s in shards if s.count > 0], spec
        self.task, self.epoch, self.seed, self.rank, self.world_size = task, epoch, seed, rank, world_size
        self.batch_size, self.steps, self.corrupt, self.bad_shard = batch_size, steps, corrupt, bad_shard
        self.window_batches = max(1, shuffle_buffer // batch_size)
        self.total = sum(s.count for s in self.shards)

    def _pass_layout(self, pass_index: int) -> tuple[list[int], np.ndarray]:
        order = np.random.default_rng([self.seed, self.task, self.epoch, pass_index]).permutation(len(self.shards))
        return order.tolist(), np.cumsum([0] + [self.shards[i].count for i in order.tolist()])

    def _locator(self) -> Locate:
        layouts: dict[int, tuple[list[int], np.ndarray]] = {}

        def locate(pos: int) -> tuple[Any, ShardInfo, int]:
            pass_index, offset = divmod(pos, self.total)
            if pass_index not in layouts:
                layouts[pass_index] = self._pass_layout(pass_index)
            order, starts = layouts[pass_index]
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            return (pass_index, slot), self.shards[order[slot]], offset - int(starts[slot])

        return locate

    def _window_batches(self, window: int) -> list[np.ndarray]:
        """Stream positions of each batch of one window (a seeded permutation of the window's positions)."""
        first = window * self.window_batches
        n_batches = min(self.steps, first + self.window_batches) - first
        start = self.rank * self.steps * self.batch_size + first * self.batch_size
        n = n_batches * self.batch_size
        perm = np.random.default_rng([self.seed, self.task, self.epoch, start]).permutation(n)
        return [start + perm[b * self.batch_size : (b + 1) * self.batch_size] for b in range(n_batches)]

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        locate = self._locator()
        n_windows = math.ceil(self.steps / self.window_batches)
        for window in range(n_windows):
            batches = self._window_batches(window)
            first = window * self.window_batches
            mine = [(first + b, pos) for b, pos in enumerate(batches) if (first + b) % num_workers == worker]
            if not mine:
                continue
            wanted = np.sort(np.concatenate([pos for _, pos in mine]))
            items = {it.position: it for it in _read_positions(wanted.tolist(), locate, self.root, self.bad_shard)}
            for batch_index, positions in mine:
                yield self._batch(batch_index, [items[int(p)] for p in positions])

    def _batch(self, batch_index: int, items: list[_Item]) -> tuple:
        delta = _new_delta()
        images: list[torch.Tensor | None] = []
        labels: list[int | None] = []
        keys: list[str | None] = []
        for item in items:
            decoded = _decode(item, delta, self.corrupt)
            if decoded is None:
                images.append(None), labels.append(None), keys.append(None)
                continue
            img, label = decoded
            rng = sample_rng(self.seed, self.task, self.epoch, item.position, item.key)
            images.append(to_uint8_chw(train_crop(img, self.spec, rng))), labels.append(label), keys.append(item.key)
        good = [i for i, x in enumerate(images) if x is not None]
        if not good:
            raise UserError(
                f"task {self.task} epoch {self.epoch}: every sample of batch {batch_index} on rank {self.rank} is "
                "unreadable; check the shards with 'sdlora data inspect --verify'"
            )
        delta["samples"] += len(good)
        for n, i in enumerate(x for x in range(len(images)) if images[x] is None):  # keep the batch full
            src = good[n % len(good)]
            images[i], labels[i], keys[i] = images[src], labels[src], keys[src]
            delta["refilled"] += 1
        return normalize_batch(torch.stack(images), self.spec), torch.tensor(labels, dtype=torch.int64), keys, delta


# --------------------------------------------------------------------------------------------------------------------
# Eval


class _EvalShards(IterableDataset):
    """One rank's contiguous share of the requested tasks' test samples, each read exactly once."""

    def __init__(self, root: Path, shards: list[ShardInfo], *, rank: int, world_size: int, batch_size: int,
                 spec: TransformSpec, corrupt: str, bad_shard: str) -> None:  # fmt: skip
        super().__init__()
        self.root, self.shards, self.spec = root, [s for s in shards if s.count > 0], spec
        self.batch_size, self.corrupt, self.bad_shard = batch_size, corrupt, bad_shard
        self.starts = np.cumsum([0] + [s.count for s in self.shards])
        total = int(self.starts[-1])
        self.begin, self.end = rank * total // world_size, (rank + 1) * total // world_size

    def _locate(self, pos: int) -> tuple[Any, ShardInfo, int]:
        slot = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return slot, self.shards[slot], pos - int(self.starts[slot])

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        starts = range(self.begin, self.end, self.batch_size)
        bounds = [(b, min(b + self.batch_size, self.end)) for b in starts][worker::num_workers]
        positions = (p for lo, hi in bounds for p in range(lo, hi))
        stream = _read_positions(positions, self._locate, self.root, self.bad_shard)
        for lo, hi in bounds:
            delta = _new_delta()
            images, labels, keys = [], [], []
            for item in (next(stream) for _ in range(hi - lo)):
                decoded = _decode(item, delta, self.corrupt)
                if decoded is not None:
                    images.append(to_uint8_chw(eval_crop(decoded[0], self.spec))), labels.append(decoded[1])
                    keys.append(item.key)
            delta["samples"] += len(images)
            if images:
                batch = normalize_batch(torch.stack(images), self.spec)
                yield batch, torch.tensor(labels, dtype=torch.int64), keys, delta
            else:
                yield None, None, [], delta


# --------------------------------------------------------------------------------------------------------------------
# Public loaders


def _identity(item: Any) -> Any:
    return item


class ShardLoader:
    """An iterable of ``(images, labels)`` batches (``(images, labels, keys)`` with ``with_keys``) with ``stats``.

    ``stats`` (LoaderStats) sums what every worker skipped; read it after the loop.
    """

    def __init__(self, dataset: IterableDataset, *, num_workers: int, length: int | None, with_keys: bool,
                 stats: LoaderStats, label_map: list[int] | None = None) -> None:  # fmt: skip
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (got {num_workers})")
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
        try:
            for images, labels, keys, delta in loader:
                self.stats.add(delta)
                if images is not None:
                    labels = labels if self.label_map is None else self.label_map[labels]
                    yield (images, labels, keys) if self.with_keys else (images, labels)
        except UserError as exc:  # re-raised from a worker with its traceback in the text: keep the message line
            text = str(exc)
            if "Original Traceback" in text:
                last = [ln for ln in text.splitlines() if ln.strip()][-1]
                raise UserError(last.split("UserError: ", 1)[-1]) from None
            raise


def train_steps_per_epoch(manifest: Manifest, task: int, global_batch: int) -> int:
    """ceil(train samples of ``task`` / ``global_batch``): the same on every rank (it reads only the manifest)."""
    if global_batch <= 0:
        raise UserError(f"the global batch size must be > 0 (got {global_batch})")
    n = manifest.num_samples("train", task)
    if n == 0:
        raise UserError(f"task {task} has no training samples in the shard set")
    return math.ceil(n / global_batch)


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    if batch_size <= 0:
        raise UserError(f"batch_size must be > 0 (got {batch_size})")


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
    with_keys: bool = False,
    manifest: Manifest | None = None,
) -> ShardLoader:
    """One epoch of ``task`` for this rank: exactly ``steps_per_epoch`` batches of ``batch_size`` (per rank).

    Reads only the task's train shards. Deterministic in (seed, task, epoch, rank, world_size), whatever
    ``num_workers``. Labels are global (int64); images NCHW float, normalised with ``spec``. ``manifest``: the run's
    view (``data.classes.task_view``: its class order and split); default the shard set's own.
    """
    _check_policy("corrupt", corrupt), _check_policy("bad_shard", bad_shard), spec.resample(train=True)
    _check_rank(rank, world_size, batch_size)
    root = Path(shards_dir)
    manifest = manifest or load_manifest(root)
    steps = steps_per_epoch or train_steps_per_epoch(manifest, task, batch_size * world_size)
    stats = LoaderStats()
    shards = _usable_shards(root, manifest.task_shards("train", task), bad_shard, stats.bad_shards)
    if not any(s.count for s in shards):
        raise UserError(f"task {task}: no readable train shard left in {root}")
    dataset = _TrainShards(
        root, shards, task=task, epoch=epoch, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size,
        steps=steps, spec=spec, corrupt=corrupt, bad_shard=bad_shard, shuffle_buffer=shuffle_buffer,
    )  # fmt: skip
    return ShardLoader(dataset, num_workers=num_workers, length=steps, with_keys=with_keys, stats=stats,
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
    with_keys: bool = False,
    manifest: Manifest | None = None,
) -> ShardLoader:
    """The test samples of ``tasks``, each exactly once across all ranks and workers (no padding).

    Ranks may get different batch counts (sum the counts with an all-reduce); the last batch may be short.
    ``manifest``: the run's view (class order and split), default the shard set's own.
    """
    _check_policy("corrupt", corrupt), _check_policy("bad_shard", bad_shard), spec.resample()
    _check_rank(rank, world_size, batch_size)
    root = Path(shards_dir)
    manifest = manifest or load_manifest(root)
    stats = LoaderStats()
    shards = [s for t in tasks for s in manifest.task_shards("test", t)]
    shards = _usable_shards(root, shards, bad_shard, stats.bad_shards)
    dataset = _EvalShards(
        root, shards, rank=rank, world_size=world_size, batch_size=batch_size, spec=spec, corrupt=corrupt,
        bad_shard=bad_shard,
    )  # fmt: skip
    return ShardLoader(dataset, num_workers=num_workers, length=None, with_keys=with_keys, stats=stats,
                       label_map=manifest.label_map)  # fmt: skip
