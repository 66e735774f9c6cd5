"""Rank records and the front door's one-line summary, without processes (the real launches are in test_launch)."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from sdlora_dist.errors import RankFailure, UserError
from sdlora_dist.jobs import ranklog


def record(run_dir, rank: int, status: str, kind: str = "", message: str = "", host: str = "node-a") -> None:
    path = ranklog.record_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"rank": rank, "host": host, "pid": 100 + rank, "status": status, "kind": kind,
            "code": ranklog.EXIT_CODES.get(kind, 0), "message": message}  # fmt: skip
    path.write_text(json.dumps(data))


def test_the_cause_is_named_not_its_consequences(tmp_path):
    # Rank 0 only saw its peer vanish, rank 2 was stopped by the launcher, rank 1 was killed without a word.
    record(tmp_path, 0, "failed", "peer", "collective 'barrier' failed")
    record(tmp_path, 1, "running", host="node-b")
    record(tmp_path, 2, "failed", "stopped", "stopped by SIGTERM from its launcher")
    line, code = ranklog.summarize(tmp_path, 1)
    assert code == 1
    assert line == (
        "error: rank 1 on node-b: died without an error (pid 101 was killed, e.g. by kill -9 or out of memory) "
        f"(full log: {tmp_path}/logs/rank_1.log)"
    )
    # A user error anywhere wins, with exit code 2.
    record(tmp_path, 2, "failed", "user", "shard train/task_000/shard-000000.tar is truncated")
    assert ranklog.summarize(tmp_path, 1) == (
        f"error: rank 2 on node-a: shard train/task_000/shard-000000.tar is truncated (full log: "
        f"{tmp_path}/logs/rank_2.log)",
        2,
    )


def test_a_rank_of_another_node_still_running_is_not_called_dead(tmp_path):
    record(tmp_path, 0, "running")  # node 0's rank, alive as far as node 1 knows
    record(tmp_path, 1, "failed", "crash", "ValueError: boom")
    line, code = ranklog.summarize(tmp_path, 1, ours=range(1, 2))
    assert line.startswith("error: rank 1 on node-a: ValueError: boom") and code == 1


def test_signals_and_no_records(tmp_path):
    assert ranklog.summarize(tmp_path, 130, "SIGINT") == (
        f"error: interrupted (Ctrl-C); resume with: sdlora train --resume {tmp_path}",
        130,
    )
    assert ranklog.summarize(tmp_path, 143, "SIGTERM")[1] == 143
    line, code = ranklog.summarize(tmp_path, 7)
    assert code == 1 and "launcher exit code 7" in line


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (UserError("bad value\nsecond line"), "user", "bad value"),
        (KeyboardInterrupt(), "interrupted", "interrupted (Ctrl-C)"),
        (RankFailure("rank 0/2: collective failed"), "peer", "rank 0/2: collective failed"),
        (OSError(errno.ENOSPC, "No space left on device", "/run/x.tmp"), "disk", None),
        (ValueError("shapes differ"), "crash", "ValueError: shapes differ"),
    ],
)
def test_classify(exc, kind, message):
    got_kind, got_message = ranklog.classify(exc)
    assert got_kind == kind and "\n" not in got_message
    if message is not None:
        assert got_message == message
    if isinstance(exc, OSError):
        assert got_message == "No space left on device writing /run/x.tmp: free space or fix permissions"


def test_run_rank_records_each_ending(tmp_path, monkeypatch):
    monkeypatch.delenv(ranklog.FRONTDOOR_ENV, raising=False)
    assert ranklog.run_rank(tmp_path, 3, lambda: None) == 0
    assert json.loads(ranklog.record_path(tmp_path, 3).read_text())["status"] == "done"

    def fail() -> None:
        raise UserError("config key x is wrong")

    assert ranklog.run_rank(tmp_path, 3, fail) == 2
    data = json.loads(ranklog.record_path(tmp_path, 3).read_text())
    assert (data["status"], data["kind"], data["code"], data["message"]) == (
        "failed",
        "user",
        2,
        "config key x is wrong",
    )
    assert data["pid"] == os.getpid()


def test_log_echo_stops_at_the_failure_mark(tmp_path):
    log = tmp_path / "rank_0.log"
    log.write_text("an earlier job's line\n")
    out = tmp_path / "console"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    echo = ranklog.LogEcho(log, out=fd, interval_s=0.01)
    with open(log, "a") as f:
        f.write("task 0: top1 50.0\n\rprogress 10%")
        f.flush()
        time.sleep(0.1)
        f.write(f"\n{ranklog.FAILURE_MARK}\nTraceback (most recent call last):\n")
    echo.stop()
    os.close(fd)
    assert out.read_bytes() == b"task 0: top1 50.0\n\rprogress 10%\n"  # the summary line starts on its own line


def test_a_crash_on_a_full_disk_is_reported_as_the_full_disk(tmp_path, monkeypatch):
    monkeypatch.delenv(ranklog.FRONTDOOR_ENV, raising=False)

    def save() -> None:  # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    assert ranklog.run_rank(tmp_path, 0, save) == 1  # plenty of space: a crash
    monkeypatch.setattr(ranklog, "_FULL_DISK_BYTES", 1 << 62)  # every disk is "full" below 4 EiB free
    assert ranklog.run_rank(tmp_path, 0, save) == 2
    message = json.loads(ranklog.record_path(tmp_path, 0).read_text())["message"]
    assert message.startswith(f"the disk holding {tmp_path} is full (RuntimeError: [enforce fail")
    assert message.endswith("): fix that")
    # the line printed adds the command that resumes the run
    record(tmp_path, 0, "failed", "disk", message)
    line, code = ranklog.summarize(tmp_path, 1)
    assert code == 2 and f"fix that; resume with: sdlora train --resume {tmp_path} (full log: " in line
