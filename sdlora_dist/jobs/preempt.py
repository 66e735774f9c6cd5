"""SIGTERM as preemption: during training a rank finishes its step, the job writes an engine checkpoint, exit 143.

SLURM (``--signal``, ``scancel``, preemption with ``--requeue``) and Kubernetes send SIGTERM, then SIGKILL after a
grace period (30 s by default). Inside a training loop (:func:`deferred`) the first SIGTERM only marks the request;
the recipe reads :func:`requested` after each optimizer step, agrees on it with the other ranks and raises
:class:`Preempted` once the checkpoint is written. Outside a training loop (setup, evaluation, the task checkpoint)
and on a second SIGTERM the rank stops at once, as before. A scheduler sends SIGTERM to every process of the job
and the launcher passes its own on, so copies arriving within ``DUPLICATE_S`` of the first count as one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

EXIT_CODE = 143  # 128 + SIGTERM: "stopped, resumable" for a requeue script or a Kubernetes podFailurePolicy
DUPLICATE_S = 2.0  # SIGTERMs closer than this to the first are the same request delivered along the process tree

_state: dict[str, float | int | str | None] = {"requested_at": None, "loops": 0, "checkpointed": None}


class Preempted(Exception):  # noqa: N818  (a stop, not an error: the run is resumable)
    """Raised on every rank after the preemption checkpoint was written; the rank exits with ``EXIT_CODE``."""


def checkpointed(message: str) -> Preempted:
    """Note that the preemption checkpoint is written (a later SIGTERM still reports it); the exception to raise."""
    _state["checkpointed"] = message
    return Preempted(message)


def checkpoint_message() -> str | None:
    """The message of the preemption checkpoint this rank wrote, or None."""
    return _state["checkpointed"]


def requested() -> bool:
    """Whether a SIGTERM asked this rank to stop at the next step boundary."""
    return _state["requested_at"] is not None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A training loop that honours a SIGTERM at its next step boundary instead of stopping at once."""
    _state["loops"] += 1
    try:
        yield
    finally:
        _state["loops"] -= 1


def install(stop_now: Callable[[], None]) -> None:
    """Handle SIGTERM in this process: defer it inside :func:`deferred`, else call ``stop_now`` (which exits).

    Only the main thread can install a handler; elsewhere (tests calling the worker from a thread) nothing changes.
    """
    _state["requested_at"] = _state["checkpointed"] = None
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: object) -> None:
        now = time.monotonic()
        first = _state["requested_at"]
        if first is None:
            _state["requested_at"] = now
            if not _state["loops"]:
                stop_now()
            return
        if now - first >= DUPLICATE_S:  # a second, real request: the grace period is the scheduler's, not ours
            stop_now()

    signal.signal(signal.SIGTERM, on_sigterm)


__all__ = [
    "EXIT_CODE", "DUPLICATE_S", "Preempted", "requested", "deferred", "install", "checkpointed", "checkpoint_message",
]  # fmt: skip
