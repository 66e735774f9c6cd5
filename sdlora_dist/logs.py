"""Rank-gated logging: the one place that decides who prints."""

from __future__ import annotations

import os
import sys


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


def log_all_ranks(message: str) -> None:
    """Print a line prefixed with the rank, for per-rank diagnostics."""
    print(f"[rank {process_rank()}] {message}", file=sys.stderr, flush=True)


__all__ = ["log_rank_zero", "log_all_ranks", "is_rank_zero", "process_rank"]
