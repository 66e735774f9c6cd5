"""Rank-gated logging: the one place that decides who prints, and how much.

Everything goes through the stdlib logger ``sdlora_dist`` on stderr (stdout stays machine-readable). A filter lets
rank 0 through, and other ranks only for records marked ``all_ranks``. The level comes from ``SDLORA_LOG_LEVEL``
(``sdlora -q`` sets WARNING, ``-v`` DEBUG); the CLI sets it in the environment, so launched ranks inherit it. Below
INFO, progress bars are off too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from sdlora_dist.jobs.rank import global_rank, is_rank_zero

LOGGER_NAME = "sdlora_dist"
LEVEL_ENV = "SDLORA_LOG_LEVEL"  # DEBUG, INFO (default), WARNING, ERROR


class RankFilter(logging.Filter):
    """Pass rank 0's records, and every rank's records that carry ``all_ranks=True`` (per-rank diagnostics)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank_zero() or bool(getattr(record, "all_ranks", False))


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler bound to whatever ``sys.stderr`` is at emit time (pytest's capture swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream(): that flushes the old stream, which may be closed by now
        super().emit(record)


def env_level() -> int:
    """The level ``SDLORA_LOG_LEVEL`` names (INFO when unset or unknown)."""
    value = os.environ.get(LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(value)
    return level if isinstance(level, int) else logging.INFO


def get_logger() -> logging.Logger:
    """The package logger, configured once (one stderr handler with the rank filter), level from the environment."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankFilter())
        logger.addHandler(handler)
        logger.propagate = False  # a host application's root handler would print every line twice
    logger.setLevel(env_level())
    return logger


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """``-q`` (warnings and errors only, no progress bars) or ``-v`` (debug); exported so launched ranks follow."""
    if quiet or verbose:
        os.environ[LEVEL_ENV] = "WARNING" if quiet else "DEBUG"
    get_logger()


def log_rank_zero(message: str) -> None:
    """An INFO progress line, printed on rank 0 only."""
    get_logger().info(message)


def log_all_ranks(message: str) -> None:
    """An INFO line prefixed with the rank, printed by every rank (per-rank diagnostics)."""
    get_logger().info(f"[rank {global_rank()}] {message}", extra={"all_ranks": True})


def log_warning(message: str) -> None:
    """A WARNING line on rank 0 (still shown under ``-q``)."""
    get_logger().warning(message)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm on stderr: live on a terminal, at most one line every 30 s in a log file (cluster job files, CI); off
    under ``-q`` (level above INFO).

    Postfix updates must pass ``refresh=False`` (tqdm redraws at once otherwise, whatever ``mininterval``).
    """
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("leave", False)
    if env_level() > logging.INFO:
        kwargs["disable"] = True
    return tqdm(iterable, file=sys.stderr, mininterval=0.2 if interactive else 30.0, dynamic_ncols=interactive,
                **kwargs)  # fmt: skip


__all__ = ["log_rank_zero", "log_all_ranks", "log_warning", "progress_bar", "set_verbosity", "get_logger"]
