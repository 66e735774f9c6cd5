"""SLURM's view of a job, from the variables srun and sbatch set (torch-free: the front door uses it too)."""

from __future__ import annotations

from collections.abc import Mapping

from sdlora_dist.errors import UserError


def first_slurm_host(nodelist: str) -> str:
    """First host of a compressed SLURM node list: ``gpu[003-010,020],cpu1`` -> ``gpu003``."""
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    if "[" not in nodelist:
        return nodelist.strip()
    prefix, rest = nodelist.split("[", 1)
    ranges, _, suffix = rest.partition("]")
    return prefix.strip() + ranges.split(",")[0].split("-")[0] + suffix


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    """``environ[name]`` as an int (None when unset or empty); UserError naming the variable when it is not one."""
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer (got {value!r})") from None


def slurm_to_torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK/WORLD_SIZE/... from the variables ``srun`` sets for each task (empty outside an srun step)."""
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ or world is None:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job_id = env_int(environ, "SLURM_JOB_ID") or 0
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
        # A port derived from the job id keeps two jobs sharing a node apart.
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


__all__ = ["first_slurm_host", "env_int", "slurm_to_torch_env"]
