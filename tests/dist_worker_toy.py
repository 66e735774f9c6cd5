"""A tiny distributed worker for the launcher and distributed-layer tests (run once per rank by a launcher).

``python -m dist_worker_toy SCENARIO[,SCENARIO] --out DIR [--timeout S]``, with ``tests/`` on PYTHONPATH. Each
scenario uses ``sdlora_dist.jobs.distributed`` exactly as the training worker does and writes what it observed to
``DIR/<scenario>_rank{R}.json`` (or ``.pt``) for the test to compare. The tests import the model/batch helpers too,
to compute single-process references with the same code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sdlora_dist.jobs.distributed as D  # noqa: N812  (also applies the torchvision compat fix before timm)
from sdlora_dist.errors import UserError
from sdlora_dist.jobs.rank import global_rank
from sdlora_dist.jobs.ranklog import run_rank

GLOBAL_BATCH = 8
NUM_CLASSES = 10


class _Cfg:
    zero_stage = 0


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range, for a rendezvous whose port must be fixed in advance.

    A port from ``bind(port 0)`` is ephemeral: between choosing it and the rank-0 store binding it, any outgoing
    connection on the machine (other jobs' ranks, other tests) may be handed the same port by the kernel. Ports
    below the range are never handed out that way; the random pick keeps concurrent tests apart.
    """
    import random
    import socket

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(100):
        port = rng.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000..{low}")


def make_model(seed: int = 0) -> nn.Module:
    """Seeded tiny ViT with a LoRA-like trainable subset: head, block 1's qkv weight, block 0's first norm.

    (No qkv bias: the key bias gets an exactly-zero gradient, which Adam would turn into rounding noise.)
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=NUM_CLASSES,
    )
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("head.", "blocks.1.attn.qkv.weight", "blocks.0.norm1.")))
    return model


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch every scenario splits over ranks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    return x, torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's optimizer) or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def make_mlp(seed: int = 0) -> nn.Module:
    """A seeded MLP on flattened images (no timm import: the launcher tests start many processes)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.GELU(), nn.Linear(16, NUM_CLASSES))
    model[1].requires_grad_(False)
    return model


def train(optimizer_name: str, steps: int, rank: int, world: int, vit: bool = True) -> dict[str, torch.Tensor]:
    """``steps`` engine steps on this rank's slice of the global batch; returns the trainable parameters."""
    model = make_model() if vit else make_mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = make_batch()
    per_rank = GLOBAL_BATCH // world
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    cfg = D.deepspeed_config(_Cfg, micro_batch_per_rank=per_rank, world_size=world, precision="fp32")
    engine = D.build_engine(model, params, make_optimizer(optimizer_name, params), None, cfg)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(engine(xs), ys)
        engine.backward(loss)
        engine.step()
    D.release_engine(engine)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checksum(tensors: list[torch.Tensor]) -> str:
    """sha256 over the raw bytes of ``tensors``."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def scenario_dp(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Data-parallel arithmetic: 3 steps with SGD momentum, then 3 with AdamW (a fresh engine each)."""
    result = {opt: train(opt, 3, env.rank, env.world_size) for opt in ("sgd", "adamw")}
    torch.save(result, out / f"dp_rank{env.rank}.pt")


def scenario_decide(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Train a few steps, let rank 0 decide a consolidation-like update, broadcast it, apply it everywhere."""
    params = train("sgd", 2, env.rank, env.world_size, vit=False)
    names = sorted(params)
    # Rank 0's decision depends on something only rank 0 knows (its own random draw), so only a broadcast can
    # make the other ranks apply the same thing.
    gen = torch.Generator().manual_seed(1000 + env.rank + int(time.time_ns() % 1000))
    decision = {
        "absorb": bool(torch.rand(1, generator=gen).item() > 0.5),
        "scale": torch.rand(1, generator=gen).item(),
    }
    delta = torch.randn(params[names[0]].shape, generator=gen)
    decision = D.broadcast_object(decision)
    D.broadcast_tensors([delta])
    params[names[0]] += decision["scale"] * delta
    applied = checksum([params[n] for n in names])
    D.assert_ranks_agree(applied, "toy adapter state")
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "node_rank": env.node_rank,
        "local_rank": env.local_rank,
        "decision": decision,
        "delta_sum": float(delta.double().sum()),
        "checksum": applied,
    }
    (out / f"decide_rank{env.rank}.json").write_text(json.dumps(record))


def _only_rank_zero_reads(env: D.DistEnv, what: str) -> dict[str, torch.Tensor] | None:
    """What tensors_from_rank_zero's reader sees: a file only rank 0's node has (no other rank may call this)."""
    if env.rank != 0:
        raise AssertionError(f"rank {env.rank} read a file only rank 0 has")
    if what == "fail":
        raise UserError("task 0 of RUN has no ridge head statistics; keep the run's settings")
    if what == "none":
        return None
    return {"sums": torch.arange(6, dtype=torch.float64).reshape(2, 3), "count": torch.tensor([4, 5])}


def scenario_collectives(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Broadcast, all-reduce and all-gather results, the error assert_ranks_agree raises on disagreement, and what
    tensors_from_rank_zero gives every rank (tensors, a read error, nothing)."""
    obj = D.broadcast_object({"from": env.rank, "payload": [env.rank] * 3})
    t = torch.full((2, 3), float(env.rank + 1)).t()  # non-contiguous on purpose
    D.broadcast_tensors([t], src=1)
    summed = D.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    gathered = D.all_gather_object(f"r{env.rank}")
    D.assert_ranks_agree("same-everywhere", "agreeing state")
    try:
        D.assert_ranks_agree(f"state-of-{env.rank}", "adapter checksum")
        error = None
    except RuntimeError as exc:
        error = str(exc)
    read = D.tensors_from_rank_zero(lambda: _only_rank_zero_reads(env, "ok"), "cpu")
    try:
        D.tensors_from_rank_zero(lambda: _only_rank_zero_reads(env, "fail"), "cpu")
        read_error = None
    except UserError as exc:
        read_error = str(exc)
    nothing = D.tensors_from_rank_zero(lambda: _only_rank_zero_reads(env, "none"), "cpu")
    D.barrier()
    record = {
        "obj": obj,
        "tensor": t.tolist(),
        "sum": summed.item(),
        "gathered": gathered,
        "error": error,
        "read": {k: [str(v.dtype), v.tolist()] for k, v in read.items()},
        "read_error": read_error,
        "read_nothing": nothing,
    }
    (out / f"collectives_rank{env.rank}.json").write_text(json.dumps(record))


def scenario_hang(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Loop on collectives until a peer is killed; the test checks how and how fast the job ends."""
    tmp = out / f".hang_rank{env.rank}.pid"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"hang_rank{env.rank}.pid")  # the test reads it as soon as it exists
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        D.all_reduce_sum(torch.ones(4))
        time.sleep(0.05)


def scenario_deaf(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Ignore SIGINT and SIGTERM, as a rank blocked inside a collective does (no Python handler runs there)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tmp = out / f".hang_rank{env.rank}.pid"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"hang_rank{env.rank}.pid")
    time.sleep(120)


def scenario_user_error_rank1(env: D.DistEnv, out: Path, args: argparse.Namespace) -> None:
    """Rank 1 alone finds bad input (as a rank reading its own shard would); rank 0 waits in a collective."""
    D.barrier()
    if env.rank == 1:
        raise UserError(f"shard {out}/bad.tar is damaged (toy): re-create it with 'sdlora data prepare'")
    D.barrier()


SCENARIOS: dict[str, Any] = {
    "dp": scenario_dp,
    "decide": scenario_decide,
    "collectives": scenario_collectives,
    "hang": scenario_hang,
    "deaf": scenario_deaf,
    "user_error_rank1": scenario_user_error_rank1,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenarios", help=f"comma-separated, run in order: {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def body() -> None:
        env = D.init_distributed(timeout_s=args.timeout)
        try:
            for name in args.scenarios.split(","):
                SCENARIOS[name](env, args.out, args)
            D.barrier()
        finally:
            D.shutdown()

    # The same log, record and launcher watchdog as the training worker (OUT plays the run directory).
    return run_rank(args.out, global_rank(), body)


if __name__ == "__main__":
    code = main()
    # Like sdlora_dist.jobs.worker: skip interpreter finalisation, which can race gloo's threads into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
