"""The per-task streaming pipeline: exact step counts, determinism, task isolation, corrupt data, transforms."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import eval_transform, read_shard_set, rewrite_shard, train_loader, train_transform
from PIL import Image

from sdlora_dist.data import (
    TransformSpec,
    load_manifest,
    make_eval_loader,
    prepare,
    train_steps_per_epoch,
)
from sdlora_dist.data.transforms import sample_rng
from sdlora_dist.errors import UserError

SPEC = TransformSpec(img_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def shards_copy(digits_shards: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(digits_shards, tmp_path / "copy"))


def _epoch(digits_shards: Path, **kw) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    args = {"task": 1, "spec": SPEC, "batch_size": 16, "epoch": 0, "seed": 1, "with_keys": True} | kw
    return list(train_loader(digits_shards, **args))


def test_train_exact_full_batches_every_rank(digits_shards: Path) -> None:
    manifest = load_manifest(digits_shards)
    n = manifest.num_samples("train", 1)
    steps = train_steps_per_epoch(manifest, 1, 3 * 16)
    assert steps == math.ceil(n / 48)
    keys = []
    for rank in range(3):
        batches = _epoch(digits_shards, rank=rank, world_size=3)
        assert len(batches) == steps
        for images, labels, k in batches:
            assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
            assert set(labels.tolist()) <= set(manifest.task_labels(1))
            keys += k
    task_keys = {s["key"] for s in read_shard_set(digits_shards)["train"] if s["task"] == 1}
    assert set(keys) == task_keys and len(keys) == steps * 48  # all covered, the wrap-around fills the last batches


def test_train_stream_deterministic_whatever_the_workers(digits_shards: Path) -> None:
    ref = _epoch(digits_shards, rank=1, world_size=2, num_workers=0, shuffle_buffer=64)
    two = _epoch(digits_shards, rank=1, world_size=2, num_workers=2, shuffle_buffer=64)
    assert len(ref) == len(two)
    for (xa, ya, ka), (xb, yb, kb) in zip(ref, two, strict=True):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)
    other = _epoch(digits_shards, rank=1, world_size=2, epoch=1, shuffle_buffer=64)
    assert [k for *_, k in other] != [k for *_, k in ref]  # reshuffled per epoch
    first_keys = [k[0] for *_, k in ref]
    assert len(set(first_keys)) > 1


def test_pipeline_opens_only_its_task_shards(digits_shards: Path) -> None:
    """An audit hook records every file the process opens while a task's train and eval loaders run."""
    opened: list[str] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], str) and args[0].endswith(".tar"):
            opened.append(args[0])

    sys.addaudithook(hook)
    try:
        _epoch(digits_shards, task=3)
        list(make_eval_loader(digits_shards, [3], spec=SPEC, batch_size=32))
    finally:
        recording[0] = False
    manifest = load_manifest(digits_shards)
    own = {str(digits_shards / s.path) for split in ("train", "test") for s in manifest.task_shards(split, 3)}
    assert set(opened) == own


def test_eval_exactly_once_over_ranks(digits_shards: Path) -> None:
    manifest = load_manifest(digits_shards)
    expected = {s["key"]: s["label"] for s in read_shard_set(digits_shards)["test"] if s["task"] in (0, 2)}
    seen: list[str] = []
    for rank in range(3):
        loader = make_eval_loader(digits_shards, [0, 2], spec=SPEC, batch_size=10, rank=rank, world_size=3,
                                  with_keys=True)  # fmt: skip
        for images, labels, keys in loader:
            assert images.shape[1:] == (3, 16, 16)
            assert [expected[k] for k in keys] == labels.tolist()
            seen += keys
        assert loader.stats.samples > 0 and loader.stats.corrupt == 0
    assert sorted(seen) == sorted(expected)
    assert len(seen) == manifest.num_samples("test", 0) + manifest.num_samples("test", 2)


@pytest.mark.slow  # several full epochs: over 2 s
def test_corrupt_samples_skipped_and_counted(digits_shards: Path, shards_copy: Path) -> None:
    manifest = load_manifest(digits_shards)
    train_shard, test_shard = manifest.task_shards("train", 0)[1], manifest.task_shards("test", 0)[0]
    train_keys = [s["key"] for s in read_shard_set(digits_shards)["train"] if s["task"] == 0][40:42]  # in shard 1
    test_keys = {s["key"] for s in read_shard_set(digits_shards)["test"] if s["task"] == 0}
    bad_test = sorted(k for k in test_keys if k.startswith(f"test-c{test_shard.path.split('_')[1][:4]}"))[:3]
    rewrite_shard(shards_copy, train_shard.path, set(train_keys))
    rewrite_shard(shards_copy, test_shard.path, set(bad_test))
    clean_stream = [k for *_, ks in _epoch(digits_shards, task=0, num_workers=2) for k in ks]
    loader = train_loader(shards_copy, 0, spec=SPEC, batch_size=16, epoch=0, seed=1, num_workers=2)
    batches = list(loader)
    assert all(x.shape[0] == 16 for x, _ in batches) and len(batches) == len(loader)
    occurrences = sum(clean_stream.count(k) for k in train_keys)  # the stream is deterministic: count exactly
    assert loader.stats.corrupt == occurrences == loader.stats.refilled >= 2
    evl = make_eval_loader(shards_copy, [0], spec=SPEC, batch_size=8, num_workers=2, with_keys=True)
    keys = [k for *_, ks in evl for k in ks]
    assert evl.stats.corrupt == 3 and sorted(keys) == sorted(test_keys - set(bad_test))
    assert evl.stats.samples == len(test_keys) - 3
    assert {k.split(":")[1] for k in evl.stats.corrupt_keys} == set(bad_test)
    with pytest.raises(UserError, match=f"corrupt sample .* in shard {test_shard.path}"):
        list(make_eval_loader(shards_copy, [0], spec=SPEC, batch_size=8, corrupt="error"))


def test_truncated_shard_named_or_skipped(digits_shards: Path, shards_copy: Path) -> None:
    manifest = load_manifest(digits_shards)
    victim = manifest.task_shards("train", 2)[2]
    path = shards_copy / victim.path
    path.write_bytes(path.read_bytes()[: victim.bytes // 2])
    with pytest.raises(UserError, match=f"shard {victim.path} is unreadable .*truncated"):
        train_loader(shards_copy, 2, spec=SPEC, batch_size=16, epoch=0, seed=1)
    loader = train_loader(shards_copy, 2, spec=SPEC, batch_size=16, epoch=0, seed=1, bad_shard="skip",
                          num_workers=2, with_keys=True)  # fmt: skip
    batches = list(loader)
    steps = train_steps_per_epoch(manifest, 2, 16)
    assert len(batches) == steps and all(x.shape[0] == 16 for x, *_ in batches)  # same step count: no hang
    assert loader.stats.bad_shards == [victim.path]
    victim_keys = {s["key"] for s in read_shard_set(digits_shards)["train"] if s["task"] == 2}
    with pytest.raises(UserError, match="missing"):
        (shards_copy / manifest.task_shards("test", 2)[0].path).unlink()
        make_eval_loader(shards_copy, [2], spec=SPEC, batch_size=8)
    assert {k for *_, ks in batches for k in ks} <= victim_keys


def test_shard_with_garbage_inside_is_named(digits_shards: Path, shards_copy: Path) -> None:
    """Same size as the manifest says, but zeroed tar headers: the reader names the shard."""
    victim = load_manifest(digits_shards).task_shards("test", 4)[0]
    path = shards_copy / victim.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {victim.path} is unreadable"):
        list(make_eval_loader(shards_copy, [4], spec=SPEC, batch_size=8, num_workers=1))
    loader = make_eval_loader(shards_copy, [4], spec=SPEC, batch_size=8, bad_shard="skip")
    n = sum(len(y) for _, y in loader)
    total = load_manifest(digits_shards).num_samples("test", 4)
    assert 0 < n < total and loader.stats.corrupt > 0
    assert n + loader.stats.corrupt == total, (n, loader.stats.corrupt, total)  # every sample read or counted


def test_a_workers_user_error_reaches_the_caller_by_type_with_its_message(
    digits_shards: Path, shards_copy: Path
) -> None:
    """A DataLoader worker's UserError crosses as a record (kind + message): the caller gets a UserError whose text is
    exactly what the same failure says without workers, not torch's re-raise with the worker's traceback."""
    victim = load_manifest(digits_shards).task_shards("test", 4)[0]
    path = shards_copy / victim.path
    path.write_bytes(path.read_bytes()[: victim.bytes // 2] + bytes(victim.bytes - victim.bytes // 2))
    messages = []
    for workers in (0, 2):
        with pytest.raises(UserError) as info:
            list(make_eval_loader(shards_copy, [4], spec=SPEC, batch_size=8, num_workers=workers))
        assert type(info.value) is UserError
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"shard {victim.path} is unreadable (") and "\n" not in messages[0]


def test_eval_transform_matches_timm() -> None:
    import timm.data

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (45, 70, 3), dtype=np.uint8))
    spec = TransformSpec(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.9)
    timm_tf = timm.data.create_transform(
        input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.9, mean=spec.mean, std=spec.std
    )
    torch.testing.assert_close(eval_transform(img, spec), timm_tf(img), atol=1e-5, rtol=0)


def test_train_transform_seeded_and_normalised() -> None:
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (50, 80, 3), dtype=np.uint8))
    spec = TransformSpec(img_size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), train_scale=(0.3, 1.0))
    a = train_transform(img, spec, sample_rng(1, 2, 3, "k"))
    b = train_transform(img, spec, sample_rng(1, 2, 3, "k"))
    c = train_transform(img, spec, sample_rng(1, 2, 4, "k"))
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0  # normalize 'none' = mean 0, std 1: plain [0, 1] pixels
    flipped = TransformSpec(img_size=80, mean=(0, 0, 0), std=(1, 1, 1), train_scale=(1.0, 1.0), hflip=1.0)
    square = img.crop((15, 0, 65, 50))
    out = train_transform(square, flipped, sample_rng(0))
    ref = eval_transform(square.transpose(Image.FLIP_LEFT_RIGHT), TransformSpec(80, (0, 0, 0), (1, 1, 1), crop_pct=1))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # scale (1, 1) on a square: whole image, flipped


def test_task_with_fewer_samples_than_streams_fills_every_stream(tmp_path: Path) -> None:
    """3 train images in a task, 8 streams: every stream still yields its chunk, on 1 and 2 ranks alike."""
    from data_fixtures import make_image_folder

    make_image_folder(tmp_path / "src", train={"a": 2, "b": 1}, test={"a": 1, "b": 1})
    out = tmp_path / "shards"
    prepare("imagefolder", tmp_path / "src", out, tasks=1, progress=False, workers=1)
    assert load_manifest(out).num_samples("train", 0) == 3
    one = _epoch(out, task=0, batch_size=8, streams=8)
    assert len(one) == 1 and one[0][0].shape[0] == 8 and set(one[0][1].tolist()) <= {0, 1}
    halves = [_epoch(out, task=0, batch_size=4, streams=8, rank=r, world_size=2)[0] for r in range(2)]
    assert [k for h in halves for k in h[2]] == one[0][2]  # the same global batch on two ranks


@pytest.mark.slow  # several full epochs: over 2 s
def test_a_local_shard_is_entered_mid_way_by_its_headers_only(digits_shards: Path) -> None:
    """A stream whose piece starts inside a local shard skips the earlier samples by seeking over their data."""
    from sdlora_dist.data import urls
    from sdlora_dist.data.reading import tar_samples

    info = load_manifest(digits_shards).task_shards("train", 1)[0]
    path = str(digits_shards / info.path)
    everything = [s["__key__"] for s in tar_samples(path)]
    assert len(everything) == info.count
    read: list[int] = []
    original = urls.open_stream

    class Counting:
        def __init__(self, stream) -> None:  # noqa: ANN001
            self.stream = stream

        def read(self, *args) -> bytes:  # noqa: ANN002
            data = self.stream.read(*args)
            read.append(len(data))
            return data

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.stream, name)

    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    starts = {}  # sample index -> offset of its first header
    for m in members:
        starts.setdefault(m.name.split(".")[0], m.offset)
    offsets = sorted(starts.values())
    urls.open_stream = lambda url: Counting(original(url))
    try:
        list(tar_samples(path))
        full = sum(read)
        for first in (1, info.count // 2, info.count - 1):
            read.clear()
            assert [s["__key__"] for s in tar_samples(path, first)] == everything[first:]
            seeked_over = sum(-(-m.size // 512) * 512 for m in members if m.offset < offsets[first])
            # the skipped samples' data is never read: only their headers (and one stream buffer of slack)
            assert seeked_over > 0 and sum(read) <= full - seeked_over + 10240, (first, sum(read), full)
        with pytest.raises(Exception, match="ends after"):
            list(tar_samples(path, info.count + 3))
    finally:
        urls.open_stream = original
