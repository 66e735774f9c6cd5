"""Which rank this process is: the one answer every module asks (logs, checkpoints, the front door, the worker)."""

from __future__ import annotations

import os
import sys


def global_rank() -> int:
    """This process's global rank: torch.distributed's once a process group is up, else the launcher's.

    Launchers set RANK (torchrun, DeepSpeed's runner, Kubernetes) or only SLURM_PROCID (srun); a process started
    by none of them is rank 0.
    """
    # A process group exists only once torch.distributed was imported (by jobs.distributed, the one module that
    # imports it); looking it up keeps this module a leaf that logs, checkpoints and the front door can all import.
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        return int(torch_dist.get_rank())
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def is_rank_zero() -> bool:
    """True on global rank 0, the rank that decides, writes shared files and prints progress."""
    return global_rank() == 0


__all__ = ["global_rank", "is_rank_zero"]
