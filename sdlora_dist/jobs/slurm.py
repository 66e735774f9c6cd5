"""SLURM's view of a job, from the variables srun and sbatch set (torch-free: the front door uses it too)."""

from __future__ import annotations

from collections.abc import Mapping

from sdlora_dist.errors import UserError


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets at character {i + 1}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("a '[' is not closed")
    return [*parts, text[start:]]


def _expand_range(group: str) -> list[str]:
    """``01-03,7`` -> ``['01', '02', '03', '7']``: a range keeps the width of its lower bound (leading zeros)."""
    out = []
    for item in group.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in [{group}]")
        if not dash:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"range {item!r} runs backwards")
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def _expand_host(pattern: str) -> list[str]:
    """Every host of one comma-free pattern, bracket groups expanded left to right: ``r[1-2]-n[1-2]`` -> r1-n1,..."""
    hosts = [""]
    rest = pattern
    while "[" in rest:
        text, _, rest = rest.partition("[")
        group, closed, rest = rest.partition("]")
        if not closed:
            raise ValueError("a '[' is not closed")
        hosts = [h + text + n for h in hosts for n in _expand_range(group)]
    if "]" in rest:
        raise ValueError("a ']' has no '['")
    return [h + rest for h in hosts]


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a compressed SLURM host list, in SLURM's order (what ``scontrol show hostnames`` prints).

    The grammar: hosts separated by commas outside brackets; each host a name with any number of bracket groups,
    each group a comma list of numbers and ``low-high`` ranges whose width is that of ``low`` (leading zeros kept):
    ``gpu[003-004,010],cpu1`` -> gpu003 gpu004 gpu010 cpu1; ``rack[1-2]-node[01-02]`` -> rack1-node01
    rack1-node02 rack2-node01 rack2-node02. ValueError names what is malformed.
    """
    return [host for part in _split_top(nodelist.strip()) if part.strip() for host in _expand_host(part.strip())]


def first_slurm_host(nodelist: str) -> str:
    """First host of a compressed SLURM node list (the rendezvous host): ``gpu[003-010,020],cpu1`` -> ``gpu003``."""
    try:
        hosts = expand_hostlist(nodelist)
    except ValueError as exc:
        raise UserError(f"SLURM node list {nodelist!r} is malformed ({exc}): pass --master-addr ADDR") from None
    if not hosts:
        raise UserError("the SLURM node list is empty: pass --master-addr ADDR")
    return hosts[0]


def local_world_size(environ: Mapping[str, str]) -> int | None:
    """Ranks on this node as the launcher says: torchrun's LOCAL_WORLD_SIZE or DeepSpeed's LOCAL_SIZE (None: unset)."""
    return env_int(environ, "LOCAL_WORLD_SIZE") or env_int(environ, "LOCAL_SIZE")


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


__all__ = ["expand_hostlist", "first_slurm_host", "env_int", "slurm_to_torch_env"]
