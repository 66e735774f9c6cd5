"""Every distributed concern in one place: process group, DeepSpeed engine, collectives, engine checkpoints.

This is the only module that imports ``deepspeed`` or ``torch.distributed``. Everything here also works in a
single process without a launcher: collectives become identities and :func:`build_engine` creates a one-rank
process group on demand (DeepSpeed cannot build an engine without one).

CPU facts this module relies on (DeepSpeed 0.19, torch 2.13):

* ``DS_ACCELERATOR=cpu`` must be set before DeepSpeed first resolves its accelerator; we set it when CUDA is
  absent, so DeepSpeed uses gloo and no CUDA probing happens.
* Every DeepSpeed process-group start (``TorchBackend``) JIT-compiles the ``deepspeed_shm_comm`` C++ op on the
  CPU accelerator (about 30 s on 2 cores, needs a compiler). That op only serves ``inference_all_reduce``
  (tensor-parallel inference); training collectives go through torch.distributed. We mark it incompatible in
  DeepSpeed's op table before the first start, so nothing is compiled.
* The process-group timeout bounds every collective: a dead or hung peer ends the job with an error, not a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch import nn

from sdlora_dist.config import Precision, config_root
from sdlora_dist.errors import RankFailure, UserError
from sdlora_dist.jobs.rank import global_rank, is_rank_zero
from sdlora_dist.jobs.slurm import env_int, local_world_size, slurm_to_torch_env

PRECISIONS = tuple(p for p in get_args(Precision) if p != "auto")  # what "auto" resolves among
DEFAULT_TEMPLATE_NAME = "template.json"
_SHM_OP_NAME = "deepspeed_shm_comm"
_CLIENT_KEY = "sdlora_client_state"
_TIMEOUT_S = 600  # the process-group timeout in force, for error messages
# engine -> (parameter, its float32 tensor before the engine cast it): restored by release_engine
_FULL_PRECISION: weakref.WeakKeyDictionary[Any, list[tuple[nn.Parameter, torch.Tensor]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, world size, rank on its node, node index, device.

    Whether this is rank 0 is asked of :func:`sdlora_dist.jobs.rank.is_rank_zero`, the one answer for every module.
    """

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device


# --------------------------------------------------------------------------------------------------------------------
# Process group


def _node_rank(environ: dict[str, str] | os._Environ, rank: int) -> int:
    # torchrun sets GROUP_RANK, DeepSpeed's launcher CROSS_RANK, our SLURM mapping NODE_RANK.
    for name in ("GROUP_RANK", "CROSS_RANK", "NODE_RANK"):
        value = env_int(environ, name)
        if value is not None:
            return value
    local_world = local_world_size(environ)
    return rank // local_world if local_world else 0


def _want_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def _prepare_deepspeed() -> Any:
    """Import DeepSpeed with the accelerator pinned and the shm comm op (never used in training) disabled."""
    if not _want_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # The op table is computed once per process and cached in the module; DeepSpeed reads it when it starts its
    # backend and builds the shm op only where the table says it is compatible.
    deepspeed.ops.__compatible_ops__[_SHM_OP_NAME] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _current_env() -> DistEnv:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = env_int(os.environ, "LOCAL_RANK") or 0
    device = torch.device("cuda", local_rank) if _want_cuda() else torch.device("cpu")
    return DistEnv(rank, world, local_rank, _node_rank(os.environ, rank), device)


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Join the job's process group (gloo on CPU, NCCL on CUDA) through DeepSpeed and say where we are.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (set by torchrun, DeepSpeed's launcher or the user),
    or maps an srun step's SLURM_* variables onto them. Without any of them this is a single process: no process
    group is created and the world has one rank. ``timeout_s`` bounds the rendezvous and every later collective.
    """
    if timeout_s <= 0:
        raise UserError(f"the process-group timeout must be > 0 seconds (got {timeout_s})")
    if dist.is_available() and dist.is_initialized():
        return _current_env()
    for key, value in slurm_to_torch_env(os.environ).items():
        os.environ.setdefault(key, value)
    rank, world = env_int(os.environ, "RANK"), env_int(os.environ, "WORLD_SIZE")
    local_rank = env_int(os.environ, "LOCAL_RANK") or 0
    cuda = _want_cuda()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if rank is None or world is None:
        return DistEnv(0, 1, 0, 0, device)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UserError(
            f"RANK={rank} and WORLD_SIZE={world} are set but {', '.join(missing)} is not: launch through "
            "`sdlora train` (it sets them) or export the address and port of rank 0"
        )
    if not 0 <= rank < world:
        raise UserError(f"RANK must be in [0, WORLD_SIZE) (got RANK={rank}, WORLD_SIZE={world})")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's engine reads it
    if cuda:
        torch.cuda.set_device(device)
        # Let NCCL abort a collective that times out instead of blocking forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    deepspeed = _prepare_deepspeed()
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        init_method="env://",
        rank=rank,
        world_size=world,
        verbose=False,
    )
    return _current_env()


def _ensure_process_group(timeout_s: int = 600) -> None:
    """A DeepSpeed engine needs a process group; a single process gets a one-rank group on an in-memory store."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] != "1":
        init_distributed(timeout_s)
        return
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    backend = "nccl" if _want_cuda() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group (no-op without one); DeepSpeed's communication backend is reset with it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed.comm.comm as ds_comm

    if ds_comm.cdb is not None:
        # DeepSpeed's teardown also drops the sub-groups it cached (data-parallel, world clone).
        ds_comm.destroy_process_group()
        ds_comm.cdb = None  # the next start in this process builds DeepSpeed's backend afresh
    else:
        dist.destroy_process_group()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------------------------------
# Precision and DeepSpeed config


def precision_for(precision: str, device: torch.device | str) -> str:
    """Resolve ``auto`` (bf16 on CUDA, fp32 on CPU) and check the choice fits the device."""
    device_type = torch.device(device).type
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"train.precision: must be one of auto, {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "fp16" and device_type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA device; use fp32 or bf16 on CPU (got 'fp16')")
    return precision


def _template_path() -> Path:
    path = config_root() / "deepspeed" / DEFAULT_TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config template {DEFAULT_TEMPLATE_NAME} not found at {path}")
    return path


def deepspeed_config(
    train_cfg: Any,
    *,
    micro_batch_per_rank: int,
    world_size: int,
    precision: str,
    template: str | Path | None = None,
    grad_accum: int = 1,
    grad_clip: float = 0.0,
) -> dict[str, Any]:
    """DeepSpeed config for one task's engine, from ``configs/deepspeed/template.json``.

    ``train_cfg`` is the ``TrainConfig`` (its ``zero_stage`` is used); ``precision`` must already be resolved by
    :func:`precision_for`. One optimizer step per ``grad_accum`` micro batches, so the global batch is
    ``micro_batch_per_rank * world_size * grad_accum``; ``grad_clip`` > 0 clips the global gradient norm. The
    optimizer and LR schedule are torch objects made by the caller and passed to :func:`build_engine`: DeepSpeed
    then builds no optimizer of its own and no fused op.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be resolved to one of {PRECISIONS} first (got {precision!r})")
    if micro_batch_per_rank <= 0 or world_size <= 0:
        raise ValueError(f"micro batch and world size must be > 0 (got {micro_batch_per_rank}, {world_size})")
    path = Path(template) if template is not None else _template_path()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"DeepSpeed template {path} could not be read as JSON: {exc}") from exc
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_per_rank
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_per_rank * world_size * grad_accum
    cfg["gradient_clipping"] = float(grad_clip)
    cfg.setdefault("zero_optimization", {})["stage"] = int(train_cfg.zero_stage)
    cfg.setdefault("bf16", {})["enabled"] = precision == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = precision == "fp16"
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# Engine


def build_engine(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ds_config: dict[str, Any],
) -> Any:
    """Wrap ``model`` in a DeepSpeed engine that trains exactly ``params`` with the caller's optimizer.

    One engine per task: the trainable set changes between tasks, so build a new one and call
    :func:`release_engine` on the old one. The engine averages gradients over ranks in ``engine.backward`` and
    steps the optimizer and ``lr_scheduler`` (once per optimizer step) in ``engine.step``. On a single process
    without a launcher a one-rank process group is created first.

    With bf16/fp16 DeepSpeed casts every parameter of ``model`` (frozen ones too) to the low precision; the
    float32 tensors are kept here (no copy: the cast makes new ones) and put back by :func:`release_engine`.
    """
    if not params:
        raise ValueError("build_engine needs at least one trainable parameter")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"params at positions {frozen} have requires_grad=False; pass only trainable parameters")
    deepspeed = _prepare_deepspeed()
    _ensure_process_group()
    full_precision = [(p, p.data) for p in model.parameters()]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    _FULL_PRECISION[engine] = full_precision
    return engine


def release_engine(engine: Any) -> None:
    """Give the model back in its own precision and remove the engine's hooks (the next task's engine starts clean).

    Low precision lives only inside an engine. Afterwards every parameter is its float32 tensor again: frozen ones
    as they were before the engine (W0 and past factors never take bf16 rounding), trained ones with the
    optimizer's float32 master values. So evaluation, consolidation (the normalisers and KD's least-squares fit
    need float32: bf16 keeps 8 significant bits, 0.4 % per rounding, and a near-singular Gram matrix amplifies
    that) and checkpoints all see float32, and a bf16 run's checkpoints load into a float32 run.
    Every rank must call this (reading a ZeRO-partitioned master is a collective).
    """
    masters = _master_weights(engine)
    for param, full in _FULL_PRECISION.pop(engine, []):
        if param.requires_grad:
            master = masters(param)
            full.copy_(master if master is not None else param.data)
        param.data = full
    engine.destroy()


def _master_weights(engine: Any) -> Callable[[nn.Parameter], torch.Tensor | None]:
    """``param -> its float32 master tensor`` (None where the optimizer keeps none, e.g. plain fp32 training)."""
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = getattr(engine, "optimizer", None)
    # Without ZeRO, bf16 and fp16 wrap the optimizer in DeepSpeed's unfused FP16 optimizer: one float32 copy per
    # parameter, in lists parallel to the low-precision groups. ZeRO 1/2 and BF16_Optimizer link each parameter to
    # its (possibly partitioned) master instead, read by safe_get_full_fp32_param.
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    by_id: dict[int, torch.Tensor] = {}
    if isinstance(low, list) and isinstance(high, list) and all(isinstance(g, list) for g in high):
        by_id = {id(lp): hp for lg, hg in zip(low, high, strict=True) for lp, hp in zip(lg, hg, strict=True)}
    return lambda param: by_id[id(param)] if id(param) in by_id else safe_get_full_fp32_param(param)


# --------------------------------------------------------------------------------------------------------------------
# Collectives (identity on one rank)


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a backend failure into one error naming this rank and the likely cause; the original is chained."""
    try:
        yield
    except RuntimeError as exc:  # gloo reports a vanished peer as a plain RuntimeError, NCCL as DistBackendError
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise RankFailure(
            f"rank {global_rank()}/{world_size()}: collective {what!r} failed: a peer rank died, or did not answer "
            f"within the process-group timeout ({_TIMEOUT_S} s), or ranks ran different collectives "
            f"({exc.__class__.__name__}: {first_line})"
        ) from exc


def _raised_by_torch_distributed(exc: BaseException) -> bool:
    """True for an error out of a torch.distributed call: a DistError (NCCL's failures, store and network errors),
    or a plain RuntimeError raised inside torch.distributed, which is how gloo reports a lost or silent peer (it has
    no exception type of its own, so the frame that raised it is the evidence, not its text)."""
    if isinstance(exc, dist.DistError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the innermost frame: where the error was raised
    origin = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(exc, RuntimeError) and (origin == "torch.distributed" or origin.startswith("torch.distributed."))


@contextlib.contextmanager
def peer_failures() -> Iterator[None]:
    """Re-raise a collective that failed anywhere inside (DeepSpeed's gradient all-reduce too) as RankFailure.

    The worker runs the whole training inside this, so its record calls the failure a consequence of a peer's
    (exit class ``peer``); every other error passes unchanged. The message keeps the backend's words.
    """
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, RankFailure) or not _raised_by_torch_distributed(exc):
            raise
        raise RankFailure(str(exc)) from exc


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not _active():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    with _collective("broadcast_object"):
        dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (shapes must match across ranks)."""
    if not _active():
        return
    with _collective("broadcast_tensors"):
        for t in tensors:
            buf = t if t.is_contiguous() else t.contiguous()
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)


def tensors_from_rank_zero(
    read: Callable[[], dict[str, torch.Tensor] | None], device: torch.device | str
) -> dict[str, torch.Tensor] | None:
    """Rank 0's ``read()`` (CPU tensors) on every rank. Only rank 0 reads: the other nodes may not see the files
    rank 0 wrote (a run directory on node-local disk). A ``UserError`` of rank 0's read is raised on every rank."""
    if not _active():
        return read()
    meta: Any = None
    mine: dict[str, torch.Tensor] | None = None
    if dist.get_rank() == 0:
        try:
            mine = read()
        except UserError as exc:
            broadcast_object(("error", str(exc)))
            raise
        meta = None if mine is None else ("ok", {k: (tuple(v.shape), v.dtype) for k, v in mine.items()})
    meta = broadcast_object(meta)
    if meta is None:
        return None
    if meta[0] == "error":
        raise UserError(meta[1])
    out = {k: (mine[k] if mine is not None else torch.empty(shape, dtype=dtype)).to(device)
           for k, (shape, dtype) in meta[1].items()}  # fmt: skip
    broadcast_tensors(list(out.values()))
    return {k: v.cpu() for k, v in out.items()}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it."""
    if _active():
        with _collective("all_reduce_sum"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait for every rank."""
    if _active():
        with _collective("barrier"):
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def assert_ranks_agree(checksum: str, what: str) -> None:
    """Raise on every rank, naming the ranks that differ from rank 0, unless all ranks hold ``checksum``."""
    gathered = all_gather_object(checksum)
    wrong = [r for r, value in enumerate(gathered) if value != gathered[0]]
    if wrong:
        groups: dict[str, list[int]] = {}
        for r, value in enumerate(gathered):
            groups.setdefault(value, []).append(r)
        detail = "; ".join(f"ranks {ranks} have {value}" for value, ranks in groups.items())
        raise RuntimeError(f"{what}: ranks {wrong} disagree with rank 0 ({detail})")


# --------------------------------------------------------------------------------------------------------------------
# Engine checkpoints (all ranks call; the finished directory appears atomically)


def _tmp_tag(tag: str) -> str:
    return f".{tag}.partial"


def _writer_rank(engine: Any) -> bool:
    # Without a shared filesystem every node writes its own copy, so each node's first rank renames it.
    local = engine.use_node_local_storage() if hasattr(engine, "use_node_local_storage") else False
    return (int(os.environ.get("LOCAL_RANK", "0")) == 0) if local else is_rank_zero()


def save_engine_checkpoint(engine: Any, directory: str | Path, tag: str, client_state: dict | None = None) -> Path:
    """Save the engine (trainable weights, optimizer, LR schedule) and ``client_state`` as ``directory/tag``.

    Frozen parameters are left out (they live in the task checkpoint). Every rank must call this. The files are
    written under a hidden temporary tag and renamed once all ranks are done, so a kill mid-write never leaves a
    ``directory/tag`` that :func:`load_engine_checkpoint` would read.
    """
    directory = Path(directory)
    tmp = _tmp_tag(tag)
    if _writer_rank(engine):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory / tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(
        str(directory),
        tag=tmp,
        client_state={_CLIENT_KEY: dict(client_state or {})},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    barrier()
    if _writer_rank(engine):
        final = directory / tag
        if final.exists():
            old = directory / f".{tag}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            (directory / tmp).rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            (directory / tmp).rename(final)
    barrier()
    return directory / tag


def load_engine_checkpoint(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Restore what :func:`save_engine_checkpoint` wrote into ``engine``; return the saved ``client_state``."""
    path = Path(directory) / tag
    if not path.is_dir():
        raise UserError(f"engine checkpoint {path} does not exist: pass a run directory with a complete checkpoint")
    partitions = len(list(path.glob("zero_pp_rank_*_optim_states.pt")))
    if partitions and partitions != world_size():
        # ZeRO >= 1 splits the optimizer state per rank; DeepSpeed cannot re-split it (ZeRO 0 keeps it whole).
        raise UserError(
            f"engine checkpoint {path} holds optimizer state split over {partitions} ranks (ZeRO stage >= 1) and "
            f"cannot be loaded on {world_size()}: resume on {partitions} ranks, or delete {path.parent} to restart "
            "that task from its beginning on any number of ranks"
        )
    load_path, client_state = engine.load_checkpoint(
        str(directory), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise UserError(f"engine checkpoint {path} could not be loaded (incomplete or from another world size)")
    # DeepSpeed hands back its own bookkeeping next to ours; ours sits under one key.
    return dict((client_state or {}).get(_CLIENT_KEY, {}))


__all__ = [
    "DistEnv",
    "init_distributed",
    "shutdown",
    "world_size",
    "precision_for",
    "deepspeed_config",
    "build_engine",
    "release_engine",
    "peer_failures",
    "broadcast_object",
    "broadcast_tensors",
    "tensors_from_rank_zero",
    "all_reduce_sum",
    "barrier",
    "all_gather_object",
    "assert_ranks_agree",
    "save_engine_checkpoint",
    "load_engine_checkpoint",
]
