"""An exclusive lock on a run directory that works across nodes on a shared filesystem.

``RUN_DIR/run.lock`` holds JSON: the holder's host, pid, start time and a heartbeat (wall-clock seconds) that a
daemon thread refreshes every ``heartbeat_s``. A second job finds the file and exits with one line naming the
holder. The lock is taken over only when it is stale:

* the holder is on this host and its pid is gone (``kill -9`` of ``sdlora train``), or
* its heartbeat is older than ``stale_after_s`` (a holder on another node that died, or whose node died).

Why not ``fcntl``/``flock``: POSIX locks are dropped silently on some network filesystems and are invisible across
NFS clients on others, and they cannot say who holds them. ``O_CREAT | O_EXCL`` file creation and ``rename`` are
atomic on local filesystems and on NFSv3+, which is all this protocol relies on. A takeover renames the stale file
to a unique name first, so of two jobs taking over the same stale lock only one succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from sdlora_dist.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # 12 missed heartbeats: a loaded node or a slow NFS server is not taken for a dead job


@dataclass(frozen=True)
class Holder:
    """Who holds a run lock: host, pid, a unique token, when it started and its last heartbeat (epoch seconds)."""

    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        """``host H, pid P, started 12 s ago, last heartbeat 3 s ago``."""
        return (
            f"host {self.host}, pid {self.pid}, started {now - self.started:.0f} s ago, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in ``path``; None if the file is gone or unreadable (half-written by a dying holder)."""
    try:
        data = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), str(data["token"]), float(data["started"]),
                      float(data["heartbeat"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(holder: Holder | None, now: float, stale_after_s: float, host: str | None = None) -> bool:
    """True when ``holder`` cannot be running any more: dead pid on this host, or heartbeat older than the limit."""
    if holder is None:
        return True
    if holder.host == (host or socket.gethostname()) and not _pid_alive(holder.pid):
        return True
    return now - holder.heartbeat > stale_after_s


class RunLock:
    """The exclusive lock of one run directory; :meth:`acquire` raises UserError naming the holder when taken."""

    def __init__(
        self, run_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: Holder | None = None

    def _write(self, flags: int) -> None:
        fd = os.open(self.path, flags, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(self.me), "heartbeat": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())

    def _create(self) -> bool:
        try:
            self._write(os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        except OSError as exc:
            raise UserError(
                f"run directory {self.path.parent} is not writable ({exc.strerror}); pass another --run-dir"
            ) from exc
        return True

    def _take_over(self, stale: Holder | None) -> None:
        """Move the stale file aside (atomic: one taker wins), putting it back if it turned out to be fresh."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker moved it first; the caller retries the exclusive create
        moved = read_holder(aside)
        if stale is not None and moved is not None and moved.token != stale.token:
            # We moved a lock someone else just created: give it back (link fails if a third job took the name).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        self.took_over = stale

    def acquire(self) -> None:
        """Take the lock or raise UserError naming its holder; starts the heartbeat thread."""
        for _ in range(5):  # a few rounds settle concurrent takeovers
            if self._create():
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            now = time.time()
            if not is_stale(holder, now, self.stale_after_s, self.me.host):
                assert holder is not None
                raise UserError(
                    f"run directory {self.path.parent} is in use by another job ({holder.describe(now)}): wait for "
                    f"it to end or stop it; a lock whose heartbeat is older than {self.stale_after_s:.0f} s is "
                    "taken over automatically"
                )
            self._take_over(holder)
        raise UserError(f"run directory {self.path.parent}: could not take {self.path} (other jobs keep taking it)")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sdlora-runlock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.me.token:
                return  # taken over (we were judged dead): never overwrite the new holder
            tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.token}.tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump({**asdict(self.me), "heartbeat": time.time()}, f)
                os.replace(tmp, self.path)
            except OSError:
                continue  # a full or read-only disk: the job itself reports that; keep trying

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only or vanished run dir: the lock goes stale with our pid, and is taken over then


@contextmanager
def hold_run_lock(run_dir: str | Path, **kwargs: float) -> Iterator[RunLock]:
    """Hold the run directory's lock for the duration of the block (the directory must exist)."""
    lock = RunLock(run_dir, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


__all__ = ["RunLock", "Holder", "hold_run_lock", "read_holder", "is_stale", "LOCK_FILE"]
