"""Network faults are not data faults: refusals (HTTP 401/403/404, S3 AccessDenied/NoSuchBucket) fail at once with
the URL, the status and the fix; 5xx and cut connections are retried with backoff (curl's own retries off), then
the server is called unreachable. Servers on 127.0.0.1: a static HTTP server and moto."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import error_line, run_main
from data_fixtures import train_loader
from shard_servers import http_server, s3_server

from sdlora_dist.data import TransformSpec, load_manifest, urls
from sdlora_dist.errors import ServerUnreachable, UserError

SPEC = TransformSpec(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _train(location: str | Path, **kw) -> list:
    return list(train_loader(location, 0, spec=SPEC, batch_size=16, epoch=0, seed=5, with_keys=True, **kw))


def _tars(server) -> list[str]:
    return [p for p in server.requests if p.endswith(".tar")]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urls, "BACKOFF_S", 0.01)


def test_http_404_fails_at_once_with_url_and_status(digits_shards, tmp_path, fast_retries):
    served = tmp_path / "served" / "digits"
    shutil.copytree(digits_shards, served)
    victim = load_manifest(served).task_shards("train", 0)[0]
    (served / victim.path).unlink()
    with http_server(served.parent) as server:
        url = f"{server.url}/digits"
        with pytest.raises(UserError) as info:
            _train(url)
        assert _tars(server).count(f"/digits/{victim.path}") == 1  # not retried, by curl or by us
    message = str(info.value)
    assert not isinstance(info.value, ServerUnreachable) and "\n" not in message
    assert f"{url}/{victim.path}" in message and "HTTP 404" in message and "check the URL" in message, message
    assert "sdlora data prepare" not in message and "bad_shard" not in message


def test_http_503_then_recovery_continues_and_curl_does_not_retry(digits_shards, fast_retries):
    local = _train(digits_shards)
    with http_server(digits_shards.parent) as server:
        _train(f"{server.url}/digits")
        clean = sorted(_tars(server))
    with http_server(digits_shards.parent) as server:
        server.unavailable = 2  # the first two shard GETs answer 503, then the server is back
        got = _train(f"{server.url}/digits")
        first = _tars(server)[0]
        assert sorted(_tars(server)) == sorted(clean + [first, first])  # 2 x 503 re-read by us once each, no more
    assert [k for *_, k in got] == [k for *_, k in local]


def test_http_503_forever_is_unreachable_after_our_retries(digits_shards, fast_retries):
    with http_server(digits_shards.parent) as server:
        server.unavailable = 10**6
        with pytest.raises(ServerUnreachable) as info:
            _train(f"{server.url}/digits")
        assert len(_tars(server)) == urls.RETRIES + 1
    message = str(info.value)
    assert "unreachable" in message and "HTTP 503" in message and f"{urls.RETRIES + 1} attempt(s)" in message
    assert "sdlora data prepare" not in message and "bad_shard" not in message


def test_manifest_read_and_inspect_are_classified(digits_shards, tmp_path, capsys, fast_retries):
    with http_server(tmp_path) as server:  # nothing served: every path is a 404
        rc, _, err = run_main(capsys, "data", "inspect", f"{server.url}/nothing")
        line = error_line(err)
        assert rc == 2 and f"{server.url}/nothing/manifest.json" in line and "HTTP 404" in line, line
        assert len(server.requests) == 1
    with pytest.raises(ServerUnreachable, match="unreachable"):
        load_manifest("http://127.0.0.1:1/x")  # nothing listens: connection refused, retried


@pytest.mark.slow  # a moto server
def test_s3_403_and_no_such_bucket_fail_at_once(digits_shards, monkeypatch, capsys, fast_retries):
    from moto.core.authorization import enable_iam_authentication

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    with s3_server(digits_shards, "bucket", "sets/digits") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        manifest = load_manifest("s3://bucket/sets/digits")  # readable with the server's default (no IAM check)
        with enable_iam_authentication():  # from now on the key "test" is unknown to the server: 403
            with pytest.raises(UserError) as info:
                _train("s3://bucket/sets/digits", manifest=manifest)  # the shard reads meet the 403
            rc, _, err = run_main(capsys, "data", "inspect", "s3://bucket/sets/digits")
        rc_bucket, _, err_bucket = run_main(capsys, "data", "inspect", "s3://no-such-bucket/digits")
    message = str(info.value)
    shard = manifest.task_shards("train", 0)
    assert not isinstance(info.value, ServerUnreachable)
    assert "HTTP 403" in message and "AWS_ACCESS_KEY_ID" in message and "s3://bucket/sets/digits/" in message
    assert any(s.path in message for s in shard), message
    line = error_line(err)
    assert rc == 2 and "s3://bucket/sets/digits/manifest.json" in line and "HTTP 403" in line, line
    line = error_line(err_bucket)
    assert rc_bucket == 2 and "NoSuchBucket" in line and "check the bucket name" in line, line
