"""Rank-gated logging: the one place that decides who prints."""

from __future__ import annotations

import sys
from typing import Any

from sdlora_dist.jobs.rank import global_rank, is_rank_zero


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
    print(f"[rank {global_rank()}] {message}", file=sys.stderr, flush=True)


__all__ = ["log_rank_zero", "log_all_ranks", "progress_bar"]
