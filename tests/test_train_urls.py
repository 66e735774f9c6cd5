"""Training end to end from shards served over HTTP on 127.0.0.1: the same run as from the local folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import metrics, sdlora, sets
from shard_servers import http_server


@pytest.mark.slow
def test_two_ranks_over_http_match_local(digits_shards: Path, tmp_path: Path) -> None:
    shards = digits_shards
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
