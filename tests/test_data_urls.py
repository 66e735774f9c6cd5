"""Shards from URLs: HTTP, pipe:, s3:// (moto server), retries, the local cache, world-size-independent batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import read_shard_set, train_loader
from shard_servers import http_server, s3_server

from sdlora_dist.cli.main import main
from sdlora_dist.data import TransformSpec, load_manifest, make_eval_loader, urls
from sdlora_dist.data.planning import cut_pieces
from sdlora_dist.errors import ServerUnreachable, UserError

SPEC = TransformSpec(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _train(location: str | Path, **kw) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    args = {"spec": SPEC, "batch_size": 16, "epoch": 0, "seed": 5, "with_keys": True} | kw
    return list(train_loader(location, args.pop("task", 2), **args))


def _eval_keys(location: str | Path, **kw) -> list[str]:
    loader = make_eval_loader(location, [1, 3], spec=SPEC, batch_size=9, with_keys=True, **kw)
    return [k for *_, keys in loader for k in keys]


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya, ka), (xb, yb, kb) in zip(a, b, strict=True):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.slow  # servers and several full epochs: over 2 s
def test_http_and_pipe_match_local(digits_shards: Path) -> None:
    local, local_eval = _train(digits_shards), _eval_keys(digits_shards)
    with http_server(digits_shards.parent) as server:
        url = f"{server.url}/digits"
        assert load_manifest(url) == load_manifest(digits_shards)
        _same(_train(url, num_workers=2), local)
        assert _eval_keys(url, num_workers=2) == _eval_keys(digits_shards, num_workers=2)
        assert sorted(_eval_keys(url)) == sorted(local_eval)
        manifest = load_manifest(digits_shards)
        own = manifest.task_shards("train", 2) + manifest.task_shards("test", 1) + manifest.task_shards("test", 3)
        assert set(server.requests) == {f"/digits/{s.path}" for s in own} | {"/digits/manifest.json"}  # no others
    _same(_train(f"pipe:cat {digits_shards}"), local)
    _same(_train(f"file://{digits_shards}"), local)


@pytest.mark.slow  # servers and several full epochs: over 2 s
def test_s3_through_moto_server(digits_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(digits_shards, "bucket", "sets/digits") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        url = "s3://bucket/sets/digits"
        assert load_manifest(url) == load_manifest(digits_shards)
        _same(_train(url), _train(digits_shards))
        assert sorted(_eval_keys(url)) == sorted(_eval_keys(digits_shards))
        with pytest.raises(UserError, match="no readable manifest.json at s3://bucket/nothing"):
            load_manifest("s3://bucket/nothing")


def test_dropped_connection_retried_then_named(digits_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urls, "BACKOFF_S", 0.01)
    with http_server(digits_shards.parent) as server:
        _train(f"{server.url}/digits")
        clean = sorted(server.requests)
    with http_server(digits_shards.parent, drops=1) as server:  # the first shard download is cut in the middle
        _same(_train(f"{server.url}/digits"), _train(digits_shards))
        first = server.requests[1]
        assert sorted(server.requests) == sorted(clean + [first])  # that shard fetched once more: the retry
    with http_server(digits_shards.parent, drops=100) as server:
        url = f"{server.url}/digits"
        tries = urls.RETRIES + 1
        with pytest.raises(ServerUnreachable, match=rf"could not read {url}/test/.* unreachable \({tries} attempt"):
            _eval_keys(url)
        assert len([p for p in server.requests if p.endswith(".tar")]) == urls.RETRIES + 1
        with pytest.raises(ServerUnreachable, match="read http://127.0.0.1:1/x/manifest.json: the server was unr"):
            load_manifest("http://127.0.0.1:1/x")


def test_cache_dir_checked_against_sha256(digits_shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = load_manifest(digits_shards)
    with http_server(digits_shards.parent) as server:
        url = f"{server.url}/digits"
        first = _train(url, cache_dir=cache)
        assert sorted(p.name for p in cache.iterdir()) == sorted(
            f"{s.sha256}.tar" for s in manifest.task_shards("train", 2)
        )
        n_requests = len(server.requests)
        _same(_train(url, cache_dir=cache), first)  # served from the cache: only the manifest is fetched again
        assert server.requests[n_requests:] == ["/digits/manifest.json"]
    _same(first, _train(digits_shards))
    copy = tmp_path / "served" / "digits"  # the same shards behind a manifest whose sha256 for one shard is wrong
    for path in digits_shards.rglob("*.tar"):
        (copy / path.relative_to(digits_shards)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(digits_shards)).symlink_to(path)
    bad = manifest.task_shards("test", 0)[0]
    bad.sha256 = "0" * 64
    (copy / "manifest.json").write_text(manifest.to_json())
    with http_server(copy.parent) as server:
        url = f"{server.url}/digits"
        with pytest.raises(UserError, match=f"shard {url}/{bad.path} does not match the manifest's sha256"):
            list(make_eval_loader(url, [0], spec=SPEC, batch_size=8, cache_dir=cache))
    assert not (cache / f"{bad.sha256}.tar").exists() and not list(cache.glob(".*"))  # nothing half-written


def test_global_batches_independent_of_world_size(digits_shards: Path) -> None:
    one = _train(digits_shards, batch_size=32, shuffle_buffer=64)
    for world, workers in ((2, 0), (2, 2), (4, 1)):
        per_rank = [_train(digits_shards, batch_size=32 // world, rank=r, world_size=world, num_workers=workers,
                           shuffle_buffer=64) for r in range(world)]  # fmt: skip
        assert all(len(p) == len(one) for p in per_rank)
        for step, (x, y, keys) in enumerate(one):
            assert keys == [k for p in per_rank for k in p[step][2]]
            assert torch.equal(x, torch.cat([p[step][0] for p in per_rank]))
            assert torch.equal(y, torch.cat([p[step][1] for p in per_rank]))
    task_keys = {s["key"] for s in read_shard_set(digits_shards)["train"] if s["task"] == 2}
    assert {k for *_, ks in one for k in ks} == task_keys  # every sample at least once per epoch


def test_cut_pieces_balanced_and_exact() -> None:
    counts = [37, 37, 37, 37, 37, 37, 37, 28]
    pieces = cut_pieces(counts, 8, cap=36)
    lengths = [sum(b - a for _, a, b in p) for p in pieces]
    assert sum(lengths) == sum(counts) and max(lengths) <= 36
    covered = sorted((i, j) for p in pieces for i, a, b in p for j in range(a, b))
    assert covered == [(i, j) for i, c in enumerate(counts) for j in range(c)]  # every sample in exactly one piece
    whole = cut_pieces([10] * 8, 4, cap=40)
    assert [[(i, a, b) for i, a, b in p] for p in whole] == [[(2 * k, 0, 10), (2 * k + 1, 0, 10)] for k in range(4)]


def test_data_inspect_over_http(
    digits_shards: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urls, "BACKOFF_S", 0.01)
    with http_server(digits_shards.parent) as server:
        assert main(["data", "inspect", "--verify", f"{server.url}/digits"]) == 0
    out = capsys.readouterr().out
    n = sum(len(load_manifest(digits_shards).shards[s][t]) for s in ("train", "test") for t in range(5))
    assert f"verified {n} shards" in out and "benchmark digits" in out
    with http_server(digits_shards.parent / "nowhere") as server:
        assert main(["data", "inspect", f"{server.url}/digits"]) == 2
    assert "no readable manifest.json" in capsys.readouterr().err


def test_locations_compare_and_display(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert urls.same_location("shards/x", tmp_path / "shards" / "x")
    assert urls.same_location("file://" + str(tmp_path / "shards/x"), "shards/x/")
    assert urls.same_location("s3://b/p/", "s3://b/p") and not urls.same_location("s3://b/p", "s3://b/q")
    assert urls.display("shards/x") == str(tmp_path / "shards" / "x")
    assert (
        urls.display("http://h:1/s") == "http://h:1/s" and urls.join("pipe:cat /d", "m.json") == "pipe:cat /d/m.json"
    )
