"""Per-rank logs and failure records, and the one summary line the front door prints when a job fails.

Each rank started through ``sdlora train`` by a launcher (torchrun, the DeepSpeed runner, srun):

* sends its stdout and stderr (C++ output included, at the file-descriptor level) to ``RUN_DIR/logs/rank_N.log``;
  the front door echoes its node's first rank's log to the console, so the user still sees progress;
* keeps ``RUN_DIR/logs/rank_N.json`` up to date: ``running`` at start, then ``done`` or ``failed`` with the exit
  class, the exit code and the first line of the error. The file is opened once at start and rewritten in place,
  so a failure is recorded even when the run directory turned read-only or the disk filled up meanwhile;
* dies with its launcher: a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``) and a watchdog thread that
  polls the front door's pid on the same host (the launcher's own children may sit between the two).

After the launcher returns non-zero, :func:`summarize` reads the records and names the one rank that explains the
failure (a user error before a crash before a silent death before a peer that only saw the others go).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sdlora_dist.errors import RankFailure, ServerUnreachable, UserError
from sdlora_dist.jobs import preempt

LOGS_DIR = "logs"
FRONTDOOR_ENV = "SDLORA_FRONTDOOR"  # "host:pid" of the `sdlora train` process that launched this rank
FAILURE_MARK = "--- sdlora: failure details (the console shows the one-line summary) ---"
_PR_SET_PDEATHSIG = 1
# Errors a user fixes by freeing space or fixing permissions: reported like a UserError (exit 2).
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}
# Exit classes, most explanatory first: the summary names the rank of the first class present.
# "stopped": SIGTERM from the launcher, which stops the other ranks once one has failed (a consequence, never a cause).
_FULL_DISK_BYTES = 16 << 20  # less free space than one checkpoint of a small model: the likely cause of a crash
# "disk": a full or read-only disk, reported like a user error (exit 2) but the run is kept for --resume.
# "network": a data server unreachable after the retries (exit 2); the run is kept for --resume as well.
# "preempted": SIGTERM honoured at a step boundary after an engine checkpoint (jobs.preempt), exit 143.
EXIT_CODES = {
    "user": 2, "disk": 2, "network": 2, "interrupted": 130, "preempted": 143, "crash": 1, "died": 1, "peer": 1,
    "stopped": 143,
}  # fmt: skip


# endings whose line adds the command that resumes the run
RESUMABLE_HINT = ("interrupted", "disk", "network", "preempted")


@dataclass
class RankRecord:
    """What one rank reports about itself in ``logs/rank_N.json``."""

    rank: int
    host: str
    pid: int
    status: str  # running | done | failed
    kind: str = ""  # one of EXIT_CODES when failed
    code: int = 0
    message: str = ""


def log_path(run_dir: str | Path, rank: int) -> Path:
    """``RUN_DIR/logs/rank_N.log``."""
    return Path(run_dir) / LOGS_DIR / f"rank_{rank}.log"


def record_path(run_dir: str | Path, rank: int) -> Path:
    """``RUN_DIR/logs/rank_N.json``."""
    return Path(run_dir) / LOGS_DIR / f"rank_{rank}.json"


# --------------------------------------------------------------------------------------------------------------------
# Rank side


# Loaded once at import: a preexec_fn runs between fork and exec, where dlopen can deadlock on another thread's lock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits; elsewhere a no-op (the watchdog remains).

    Runs in the child (as ``preexec_fn``, or first thing in the worker) and survives ``exec``. With ``parent``,
    a parent that died before the request (it would never fire) ends this process at once.
    """
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(128 + int(sig))


def _watch_frontdoor(spec: str, interval_s: float = 0.5) -> None:
    """Exit this rank when the front door on this host is gone (a ``kill -9`` skips every other cleanup)."""
    host, _, pid_text = spec.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return  # another node: the process-group timeout ends us when the job is gone
    pid = int(pid_text)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"sdlora: the launching process {pid} is gone; stopping this rank", file=sys.stderr, flush=True)
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="sdlora-frontdoor-watchdog", daemon=True).start()


def _redirect_output(run_dir: Path, rank: int) -> None:
    path = log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


class _Recorder:
    """Holds ``rank_N.json`` open from the start and rewrites it in place (no new file needed at failure time)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.record = RankRecord(rank, socket.gethostname(), os.getpid(), "running")
        path = record_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115  (kept open for the life of the rank on purpose)
        self.lock = threading.RLock()  # re-entrant: the SIGTERM handler may interrupt a write on the main thread
        self.write()

    def write(self, **changes: object) -> None:
        with self.lock:  # the SIGTERM note writes from its own thread
            self._write(changes)

    def _write(self, changes: dict[str, object]) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps(asdict(self.record)))
        self.file.flush()


def classify(exc: BaseException) -> tuple[str, str]:
    """(exit class, one-line message) of an exception that ended a rank.

    A failed collective arrives as RankFailure: the distributed layer converts torch.distributed's errors where
    they happen (:func:`sdlora_dist.jobs.distributed.peer_failures`), so nothing here reads error text.
    """
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, ServerUnreachable):
        return "network", first
    if isinstance(exc, preempt.Preempted):
        return "preempted", first
    if isinstance(exc, UserError):
        return "user", first
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted (Ctrl-C)"
    if isinstance(exc, RankFailure):
        return "peer", first
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return "disk", f"{exc.strerror}{where}: free space or fix permissions"
    return "crash", f"{type(exc).__name__}: {first}"


def _disk_problem(run_dir: Path) -> str | None:
    """'the disk holding RUN_DIR is full' or '... is read-only' when that is so, else None."""
    try:
        if not os.access(run_dir, os.W_OK):  # EROFS even for root
            return f"the run directory {run_dir} is not writable (read-only filesystem or permissions)"
        if shutil.disk_usage(run_dir).free < _FULL_DISK_BYTES:
            return f"the disk holding {run_dir} is full"
    except OSError:
        return None
    return None


def _note_sigterm(recorder: _Recorder) -> None:
    """Mark the record ``stopped`` the moment a SIGTERM arrives, even while the main thread is blocked in a C++
    collective (where Python runs no signal handler until the call returns).

    When one rank dies mid-collective, its peers block in gloo/NCCL; the launcher's SIGTERM is then never handled
    and its SIGKILL ends them without a record, so they looked "died" like the rank that really died first.
    ``signal.set_wakeup_fd`` writes the signal number from C as it arrives; a thread reading it notes the stop.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(read_fd, 64):
            if signal.SIGTERM in data and recorder.record.status == "running":
                recorder.write(kind="stopped")

    threading.Thread(target=watch, name="sdlora-sigterm-note", daemon=True).start()


def _stopped(recorder: _Recorder) -> None:
    """SIGTERM (the launcher stopping the job): record it unless a failure is already recorded, then leave."""
    done = preempt.checkpoint_message()
    if recorder.record.status == "running" and done:  # the checkpoint is written: stopped while leaving
        recorder.write(status="failed", kind="preempted", code=preempt.EXIT_CODE, message=done)
    elif recorder.record.status == "running":
        recorder.write(status="failed", kind="stopped", code=143, message="stopped by SIGTERM from its launcher")
    sys.stderr.flush()
    os._exit(143)


def run_rank(run_dir: str | Path, rank: int, body: Callable[[], None]) -> int:
    """Run ``body`` as rank ``rank`` with its log, record and launcher watchdog; return the exit code.

    Under a front door (``SDLORA_FRONTDOOR`` set) the error goes to the rank's log only, and the front door prints
    the summary; run by hand, the rank prints its one ``error:`` line itself.
    """
    run_dir = Path(run_dir)
    frontdoor = os.environ.get(FRONTDOOR_ENV)
    if frontdoor:
        _watch_frontdoor(frontdoor)
        _redirect_output(run_dir, rank)
    recorder = _Recorder(run_dir, rank)
    if frontdoor:
        die_with_parent(signal.SIGKILL)  # the launcher is gone: nothing is left to report to
    # SIGTERM (a scheduler's preemption, or the launcher stopping the job): at the next step boundary with a
    # checkpoint inside a training loop, else at once
    preempt.install(lambda: _stopped(recorder))
    _note_sigterm(recorder)
    try:
        body()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  (every failure is recorded, then reported once)
        kind, message = classify(exc)
        problem = _disk_problem(run_dir) if kind == "crash" else None
        if problem:
            # torch.save on a full disk raises an opaque "enforce fail at inline_container.cc" RuntimeError, on a
            # read-only one "Parent directory ... does not exist": name the cause the user can fix.
            kind, message = "disk", f"{problem} ({message}): fix that"
        code = EXIT_CODES[kind]
        recorder.write(status="failed", kind=kind, code=code, message=message)
        if frontdoor:
            print(FAILURE_MARK, file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        elif kind == "crash":
            traceback.print_exc(file=sys.stderr)
        else:
            hint = f"; resume with: sdlora train --resume {run_dir}" if kind in RESUMABLE_HINT else ""
            print(f"error: {message}{hint}", file=sys.stderr, flush=True)
        return code
    recorder.write(status="done")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Front-door side


def read_records(run_dir: str | Path) -> list[RankRecord]:
    """Every ``logs/rank_N.json`` in the run directory, by rank (unreadable ones skipped)."""
    out = []
    for path in sorted((Path(run_dir) / LOGS_DIR).glob("rank_*.json")):
        try:
            out.append(RankRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.rank)


def clear_records(run_dir: str | Path, ranks: range) -> None:
    """Forget a previous job's records of ``ranks`` (the ones this node starts; other nodes may share the dir)."""
    for rank in ranks:
        record_path(run_dir, rank).unlink(missing_ok=True)


def _silent_end(record: RankRecord) -> RankRecord:
    """A rank that ended without recording how: stopped by its launcher (a deferred SIGTERM was noted while it
    finished its step: a consequence), or killed without a word (kill -9, out of memory: a cause)."""
    if record.kind == "stopped":
        record.message = "stopped by SIGTERM from its launcher while finishing its step"
    else:
        record.kind = "died"
        record.message = f"died without an error (pid {record.pid} was killed, e.g. by kill -9 or out of memory)"
    return record


def summarize(
    run_dir: str | Path, launcher_code: int, stopped_by: str | None = None, ours: range | None = None
) -> tuple[str, int]:
    """The one line and the exit code for a failed job, from the ranks' records and how the launcher ended.

    ``ours``: the ranks this node's launcher started (all when None); only those are surely gone now, so only
    those still marked ``running`` count as killed without a word.
    """
    run_dir = Path(run_dir)
    logs = run_dir / LOGS_DIR
    if stopped_by == "SIGINT":
        return f"error: interrupted (Ctrl-C); resume with: sdlora train --resume {run_dir}", 130
    records = read_records(run_dir)
    preempted = [r for r in records if r.kind == "preempted"]
    if stopped_by == "SIGTERM" and preempted:
        return f"error: {preempted[0].message}; resume with: sdlora train --resume {run_dir}", preempt.EXIT_CODE
    if stopped_by is not None:
        return f"error: stopped by {stopped_by}; resume with: sdlora train --resume {run_dir}", 128 + getattr(
            signal, stopped_by
        )
    failed = [r for r in records if r.status == "failed"]
    for record in records:  # a rank still "running" after its launcher ended was killed without a word
        if record.status == "running" and (ours is None or record.rank in ours):
            failed.append(_silent_end(record))
    order = list(EXIT_CODES)
    failed.sort(key=lambda r: (order.index(r.kind) if r.kind in order else len(order), r.rank))
    if not failed:
        return f"error: the training job failed (launcher exit code {launcher_code}); see {logs}", 1
    first = failed[0]
    where = f"rank {first.rank} on {first.host}"
    hint = f"; resume with: sdlora train --resume {run_dir}" if first.kind in RESUMABLE_HINT else ""
    return (
        f"error: {where}: {first.message}{hint} (full log: {log_path(run_dir, first.rank)})",
        EXIT_CODES[first.kind],
    )


class LogEcho:
    """Copy a rank's log to the console as it grows, up to the failure mark (a thread; :meth:`stop` drains)."""

    def __init__(self, path: Path, out: int = 2, interval_s: float = 0.2) -> None:
        self.path, self.out, self.interval_s = path, out, interval_s
        self.offset = path.stat().st_size if path.exists() else 0  # earlier jobs' text is not echoed again
        self._stop = threading.Event()
        self._done = False
        self._open_line = False
        self._thread = threading.Thread(target=self._run, name="sdlora-log-echo", daemon=True)
        self._thread.start()

    def _pump(self, final: bool = False) -> None:
        if self._done or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        mark = chunk.find(FAILURE_MARK.encode())
        if mark >= 0:
            chunk, self._done = chunk[:mark], True
        elif not final:  # whole lines (or progress-bar updates) only: the mark may still be arriving
            end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
            chunk = chunk[: end + 1]
        self.offset += len(chunk)
        if chunk:
            os.write(self.out, chunk)
            self._open_line = not chunk.endswith(b"\n")
        if (final or self._done) and self._open_line:
            os.write(self.out, b"\n")  # the summary line must start on a line of its own
            self._open_line = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._pump()

    def stop(self) -> None:
        """Stop the thread and echo whatever was written last."""
        self._stop.set()
        self._thread.join()
        self._pump(final=True)


__all__ = [
    "RankRecord",
    "run_rank",
    "summarize",
    "read_records",
    "clear_records",
    "LogEcho",
    "die_with_parent",
    "log_path",
    "record_path",
    "FRONTDOOR_ENV",
    "LOGS_DIR",
]
