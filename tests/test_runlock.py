"""The run-directory lock: one job per run directory, the holder named, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sdlora_dist.errors import UserError
from sdlora_dist.jobs.runlock import LOCK_FILE, RunLock, hold_run_lock, read_holder


def write_lock(run_dir, *, host: str, pid: int, heartbeat_age_s: float) -> None:
    now = time.time()
    record = {"host": host, "pid": pid, "token": "t-old", "started": now - 3600, "heartbeat": now - heartbeat_age_s}
    (run_dir / LOCK_FILE).write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with hold_run_lock(tmp_path) as first:
        holder = read_holder(tmp_path / LOCK_FILE)
        assert (holder.host, holder.pid, holder.token) == (socket.gethostname(), os.getpid(), first.me.token)
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert "\n" not in message
        assert f"is in use by another job (host {socket.gethostname()}, pid {os.getpid()}, started 0 s ago" in message
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    with hold_run_lock(tmp_path):
        pass


@pytest.mark.slow
def test_dead_pid_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid(), heartbeat_age_s=1)
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        assert lock.took_over is not None and lock.took_over.token == "t-old"
        assert read_holder(tmp_path / LOCK_FILE).token == lock.me.token
    finally:
        lock.release()


def test_old_heartbeat_on_another_host_is_taken_over_and_a_fresh_one_is_not(tmp_path):
    write_lock(tmp_path, host="node-that-died", pid=1, heartbeat_age_s=120)
    with hold_run_lock(tmp_path, stale_after_s=60) as lock:
        assert lock.took_over.host == "node-that-died"
    write_lock(tmp_path, host="node-7", pid=1, heartbeat_age_s=5)
    with pytest.raises(UserError, match=r"in use by another job \(host node-7, pid 1, .*last heartbeat 5 s ago\)"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    assert read_holder(tmp_path / LOCK_FILE).host == "node-7"  # a refused job leaves the lock alone


@pytest.mark.slow
def test_live_pid_on_this_host_with_fresh_heartbeat_is_not_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=other.pid, heartbeat_age_s=1)
        with pytest.raises(UserError, match=f"pid {other.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()


def test_heartbeat_refreshes_and_stops_when_taken_over(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        first = read_holder(tmp_path / LOCK_FILE).heartbeat
        time.sleep(0.3)
        assert read_holder(tmp_path / LOCK_FILE).heartbeat > first
        # Judged dead elsewhere and taken over: the old holder must never overwrite the new one.
        write_lock(tmp_path, host="new-holder", pid=1, heartbeat_age_s=0)
        time.sleep(0.3)
        assert read_holder(tmp_path / LOCK_FILE).host == "new-holder"
    finally:
        lock.release()
    assert read_holder(tmp_path / LOCK_FILE).host == "new-holder"  # release removes only its own lock
