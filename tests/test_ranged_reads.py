"""Ranged reads: a stream opens a shard at its first sample (a seek, an HTTP Range or S3 ranged GET) from the
manifest's per-sample byte offsets; shard sets without offsets, ``pipe:`` URLs and servers that ignore Range read
forward and give the same samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_SHARD_SIZE
from data_fixtures import train_loader
from shard_servers import http_server, s3_server

from sdlora_dist.data import TransformSpec, byteranges, load_manifest, prepare, urls
from sdlora_dist.data.manifest import MANIFEST_NAME, ShardInfo
from sdlora_dist.data.planning import Segment
from sdlora_dist.data.reading import Item, ShardSource, sample_offsets
from sdlora_dist.errors import UserError

SPEC = TransformSpec(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TASK = 2  # 287 train samples in shards of 37 + 28: 8 streams of at most 36 samples cut inside every shard


@pytest.fixture
def forward_set(digits_shards: Path, tmp_path: Path) -> Path:
    """The digits shards (symlinked) behind a manifest without offsets, as written before they were recorded."""
    copy = tmp_path / "served" / "forward"
    for path in digits_shards.rglob("*.tar"):
        (copy / path.relative_to(digits_shards)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(digits_shards)).symlink_to(path)
    raw = json.loads((digits_shards / MANIFEST_NAME).read_text())
    for shards in (c for split in raw["class_shards"].values() for c in split):
        for shard in shards:
            assert len(shard.pop("offsets")) == shard["count"] + 1
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    return copy


def _segments(location: str | Path) -> list[Segment]:
    """Segments of every train shard of TASK: whole, from the second sample, from the middle, the last sample."""
    shards = load_manifest(location).task_shards("train", TASK)
    return [Segment(s, a, b) for s in shards for a, b in ((0, s.count), (1, s.count - 1), (s.count // 2, s.count),
                                                          (s.count - 1, s.count))]  # fmt: skip


def _read(location: str | Path, segments: list[Segment]) -> list[tuple[str, dict[str, bytes] | None]]:
    source = ShardSource(location, None, "error")
    items: list[Item] = [item for seg in segments for item in source.segment_items(seg)]
    assert all(item.error is None for item in items)
    return [(item.key, item.files) for item in items]


def _train(location: str | Path, **kw) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return list(train_loader(location, TASK, spec=SPEC, batch_size=16, epoch=0, seed=5, with_keys=True, **kw))


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya, ka), (xb, yb, kb) in zip(a, b, strict=True):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_ranged_http_and_pipe_match_forward_read(digits_shards: Path, forward_set: Path) -> None:
    segments = _segments(digits_shards)
    forward = _read(forward_set, _segments(forward_set))
    assert len(forward) == sum(seg.stop - seg.first for seg in segments)
    assert _read(digits_shards, segments) == forward  # local: a seek to the first sample
    with http_server(forward_set.parent) as server:
        url = f"{server.url}/{forward_set.name}"
        assert load_manifest(url).task_shards("train", TASK)[0].offsets is None
        assert _read(url, _segments(url)) == forward  # an old shard set over HTTP: today's forward read (curl)
    with http_server(digits_shards.parent) as server:
        url = f"{server.url}/{digits_shards.name}"
        assert _read(url, segments) == forward
        # the server sent each segment's samples and nothing else
        assert server.shard_bytes_sent == sum(s.shard.offsets[s.stop] - s.shard.offsets[s.first] for s in segments)
    assert _read(f"pipe:cat {digits_shards}", segments) == forward  # pipe: reads forward, dropping the prefix bytes


@pytest.mark.slow  # moto server start-up and an upload: over 2 s
def test_ranged_s3_matches_forward_read(
    digits_shards: Path, forward_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segments = _segments(digits_shards)
    with s3_server(digits_shards, "bucket", "sets/digits") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        url = "s3://bucket/sets/digits"
        shard = segments[1].shard
        body, start = byteranges.open_ranged(f"{url}/{shard.path}", shard.offsets[1], shard.offsets[2])
        body.close()
        assert start == shard.offsets[1] > 0  # the object store honoured the range
        assert _read(url, segments) == _read(forward_set, _segments(forward_set))
        _same(_train(url), _train(forward_set))


def test_server_without_range_support_falls_back_with_one_warning(
    digits_shards: Path, forward_set: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(byteranges, "_warned", set())
    expected = _train(forward_set)
    capsys.readouterr()
    with http_server(digits_shards.parent, ranges=False) as server:
        got = _train(f"{server.url}/{digits_shards.name}")
    _same(got, expected)
    lines = [line for line in capsys.readouterr().err.splitlines() if "Range" in line or "range" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: 127.0.0.1:{server.server_address[1]} ignores byte-range")


def test_global_batches_and_bytes_per_epoch(
    digits_shards: Path, forward_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_bytes = sum(s.bytes for s in load_manifest(digits_shards).task_shards("train", TASK))
    counted, original = [0], urls.open_stream

    class Counting:
        def __init__(self, stream) -> None:  # noqa: ANN001
            self.stream = stream

        def read(self, *args) -> bytes:  # noqa: ANN002
            data = self.stream.read(*args)
            counted[0] += len(data)
            return data

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.stream, name)

    monkeypatch.setattr(urls, "open_stream", lambda url: Counting(original(url)))
    forward = _train(forward_set)
    forward_ratio, counted[0] = counted[0] / task_bytes, 0
    ranged = _train(digits_shards)
    _same(ranged, forward)  # the global batches do not depend on how the shards are opened
    assert counted[0] / task_bytes <= 1.01 < forward_ratio  # local: without offsets the prefixes' headers are read
    with http_server(digits_shards.parent) as server:
        _same(_train(f"{server.url}/{digits_shards.name}"), forward)
    assert server.shard_bytes_sent / task_bytes <= 1.01


def test_offsets_checked_when_the_manifest_loads(digits_shards: Path, tmp_path: Path) -> None:
    raw = json.loads((digits_shards / MANIFEST_NAME).read_text())
    shard = raw["class_shards"]["train"][0][0]
    assert ShardInfo(**shard).offsets == sorted(shard["offsets"]) and shard["offsets"][0] == 0
    shard["offsets"] = shard["offsets"][:-1]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(UserError, match=rf"manifest.json is corrupt .*{shard['path']}: offsets must be"):
        load_manifest(tmp_path)


def test_prepare_again_records_the_offsets_of_an_old_shard_set(
    digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    old = tmp_path / "digits"
    shutil.copytree(digits_shards, old)
    raw = json.loads((old / MANIFEST_NAME).read_text())
    for shard in (s for split in raw["class_shards"].values() for c in split for s in c):
        del shard["offsets"]
    (old / MANIFEST_NAME).write_text(json.dumps(raw))
    assert all(s.offsets is None for shards in load_manifest(old).all_shards() for s in shards)
    prepare("digits", None, old, shard_size=DIGITS_SHARD_SIZE, progress=False, workers=1)
    assert "recorded the sample offsets of" in capsys.readouterr().err
    written = load_manifest(digits_shards).all_shards()
    assert load_manifest(old).all_shards() == written  # read from the tar headers: what prepare recorded
    assert [sample_offsets(old / s.path) for s in written[0]] == [s.offsets for s in written[0]]
