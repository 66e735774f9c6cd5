"""Training end to end from shards served over HTTP on 127.0.0.1: the same run as from the local folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from shard_servers import http_server
from test_train import metrics, sdlora, sets


@pytest.mark.slow
def test_two_ranks_over_http_match_local(tmp_path: Path) -> None:
    from sdlora_dist.data import prepare

    shards = tmp_path / "shards" / "digits"
    prepare("digits", None, shards, shard_size=60, progress=False, workers=2)
    args = ["--gpus-per-node", "2", *sets("train.tasks=2", "data.num_workers=2")]
    local = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(tmp_path / "local"), *args)
    assert local.returncode == 0, local.stderr[-3000:]
    with http_server(shards.parent) as server:
        url = f"{server.url}/digits"
        remote = sdlora("train", "-b", "digits", "--data", url, "--run-dir", str(tmp_path / "http"), *args)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert any(p.endswith(".tar") for p in server.requests)
    m_local, m_http = metrics(tmp_path / "local"), metrics(tmp_path / "http")
    assert [t["world_size"] for t in m_http["tasks"]] == [2, 2]
    assert m_http["accuracy"]["matrix"] == m_local["accuracy"]["matrix"]
    assert m_http["accuracy"]["totals"] == m_local["accuracy"]["totals"]
