"""Rank-gated logging: the one place that decides who prints."""

from __future__ import annotations

import os
import sys
from typing import Any


def process_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    """True on the process that owns files and console output."""
    return process_rank() == 0


def log_rank_zero(message: str) -> None:
    """Print a progress line on rank 0 only (stderr, so stdout stays machine-readable)."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm on stderr: live on a terminal, at most one line every 30 s in a log file (cluster job files, CI).

    Postfix updates must pass ``refresh=False`` (tqdm redraws at once otherwise, whatever ``mininterval``).
    """
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("leave", False)
    return tqdm(iterable, file=sys.stderr, mininterval=0.2 if interactive else 30.0, dynamic_ncols=interactive,
                **kwargs)  # fmt: skip


def log_all_ranks(message: str) -> None:
    """Print a line prefixed with the rank, for per-rank diagnostics."""
    print(f"[rank {process_rank()}] {message}", file=sys.stderr, flush=True)


__all__ = ["log_rank_zero", "log_all_ranks", "is_rank_zero", "process_rank", "progress_bar"]
