"""The distributed layer: precision, DeepSpeed config, engines, collectives, engine checkpoints, failures.

Single-process tests run in this process (a one-rank group that is torn down after each test); the multi-rank
ones start real gloo processes through ``sdlora_dist.jobs.launch`` with the toy worker in ``dist_worker_toy.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sdlora_dist.jobs.distributed as D  # noqa: N812
from sdlora_dist.config import TrainConfig
from sdlora_dist.errors import RankFailure, UserError
from sdlora_dist.jobs import ranklog
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.jobs.slurm import slurm_to_torch_env

TESTS = Path(__file__).resolve().parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


def free_port() -> int:
    """Outside the ephemeral range, where the kernel cannot hand it to another socket before the store binds it."""
    sys.path.insert(0, str(TESTS))
    from dist_worker_toy import free_port as pick

    return pick()


@pytest.fixture
def single_process(monkeypatch):
    """No launcher variables on entry; the one-rank group build_engine creates is torn down on exit."""
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    D.shutdown()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    assert not torch.distributed.is_initialized()


@pytest.fixture
def worker_env(monkeypatch):
    """Make the toy worker importable as a module by the ranks (``python -m dist_worker_toy``)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_precision_for_resolves_auto_and_rejects_impossible_choices():
    assert D.precision_for("auto", torch.device("cpu")) == "fp32"
    assert D.precision_for("auto", "cuda") == "bf16"
    assert D.precision_for("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        D.precision_for("fp16", "cpu")
    with pytest.raises(UserError, match="got 'fp8'"):
        D.precision_for("fp8", "cpu")


def test_deepspeed_config_from_template():
    cfg = D.deepspeed_config(TrainConfig(zero_stage=2), micro_batch_per_rank=16, world_size=4, precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the caller's torch objects are used
    fp32 = D.deepspeed_config(TrainConfig(), micro_batch_per_rank=8, world_size=1, precision="fp32")
    assert fp32["bf16"]["enabled"] is False and fp32["zero_optimization"]["stage"] == 0
    with pytest.raises(ValueError, match="resolved"):
        D.deepspeed_config(TrainConfig(), micro_batch_per_rank=8, world_size=1, precision="auto")


def test_slurm_step_variables_map_to_torch_ones():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[007-010]",
    }
    mapped = slurm_to_torch_env(env)
    assert mapped == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "NODE_RANK": "2",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    # The batch script itself (no srun step) is not a rank.
    assert slurm_to_torch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) == {}


def test_init_distributed_without_launcher_is_one_rank_and_no_group(single_process):
    env = D.init_distributed(timeout_s=30)
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, is_rank_zero()) == (0, 1, 0, 0, True)
    assert env.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    # Collectives are identities on one rank.
    t = torch.arange(3.0)
    assert D.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object("x") == ["x"]
    D.assert_ranks_agree("abc", "state")
    D.barrier()


def test_init_distributed_names_missing_rendezvous_variables(single_process, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT is not"):
        D.init_distributed(timeout_s=5)
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(UserError, match="RANK must be an integer"):
        D.init_distributed(timeout_s=5)


def test_a_failed_collective_anywhere_in_training_is_recorded_as_a_peer_failure(single_process):
    D._ensure_process_group(timeout_s=30)
    # gloo raises a plain RuntimeError from inside torch.distributed (here: a root rank the group does not have)
    with pytest.raises(RankFailure) as caught, D.peer_failures():
        torch.distributed.broadcast(torch.zeros(2), src=5)
    assert type(caught.value.__cause__) is RuntimeError
    assert ranklog.classify(caught.value) == ("peer", str(caught.value.__cause__).splitlines()[0])
    # NCCL and the rendezvous store raise typed errors: DistBackendError, DistNetworkError (both DistError)
    with pytest.raises(RankFailure, match="Connection reset by peer"), D.peer_failures():
        raise torch.distributed.DistNetworkError("Connection reset by peer")
    # an error of our own passes unchanged, whatever its text says
    with pytest.raises(RuntimeError, match="Gloo") as own, D.peer_failures():
        raise RuntimeError("Gloo-shaped text from our own code")
    assert not isinstance(own.value, RankFailure)
    assert ranklog.classify(own.value)[0] == "crash"


# --------------------------------------------------------------------------------------------------------------------
# One rank, in process


def _tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 3))


def _steps(engine, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()


def test_engine_per_task_and_checkpoint_roundtrip(single_process, tmp_path):
    model = _tiny_mlp()
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    # "Task 0": only the last layer trains, with SGD momentum and a per-step LR schedule.
    for p in model.parameters():
        p.requires_grad_(False)
    task0 = list(model[4].parameters())
    for p in task0:
        p.requires_grad_(True)
    opt = torch.optim.SGD(task0, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ds_cfg = D.deepspeed_config(TrainConfig(), micro_batch_per_rank=8, world_size=1, precision="fp32")
    frozen_before = model[0].weight.detach().clone()
    engine = D.build_engine(model, task0, opt, sched, ds_cfg)
    assert type(engine.optimizer) is torch.optim.SGD  # the caller's optimizer, no DeepSpeed-built one
    assert torch.distributed.get_world_size() == 1
    _steps(engine, x, y, 2)
    saved = [p.detach().clone() for p in task0]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in task0]
    out = D.save_engine_checkpoint(engine, tmp_path / "ckpt", "step2", client_state={"epoch": 3, "step": 2})
    assert out == tmp_path / "ckpt" / "step2" and out.is_dir()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step2"]  # no temp dir, no 'latest'
    _steps(engine, x, y, 2)
    assert not torch.equal(saved[0], task0[0])
    state = D.load_engine_checkpoint(engine, tmp_path / "ckpt", "step2")
    assert state == {"epoch": 3, "step": 2}
    for p, s, m in zip(task0, saved, momentum, strict=True):
        assert torch.equal(p, s)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # Saving again under the same tag replaces the checkpoint atomically.
    D.save_engine_checkpoint(engine, tmp_path / "ckpt", "step2", client_state={"epoch": 4})
    assert D.load_engine_checkpoint(engine, tmp_path / "ckpt", "step2") == {"epoch": 4}
    with pytest.raises(UserError, match="does not exist"):
        D.load_engine_checkpoint(engine, tmp_path / "ckpt", "nope")
    D.release_engine(engine)

    # "Task 1": a new engine over a different trainable set on the same model.
    for p in task0:
        p.requires_grad_(False)
    task1 = list(model[2].parameters())
    for p in task1:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in task1]
    engine = D.build_engine(model, task1, torch.optim.AdamW(task1, lr=1e-2), None, ds_cfg)
    _steps(engine, x, y, 2)
    assert all(not torch.equal(b, p) for b, p in zip(before, task1, strict=True))
    assert all(torch.equal(s, p) for s, p in zip(saved, task0, strict=True))  # last task's set is frozen now
    assert torch.equal(frozen_before, model[0].weight)
    with pytest.raises(ValueError, match="requires_grad=False"):
        D.build_engine(model, task0, torch.optim.SGD(task0, lr=0.1), None, ds_cfg)
    D.release_engine(engine)


# --------------------------------------------------------------------------------------------------------------------
# Two gloo ranks


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory):
    """One local 2-rank job (torchrun via launch()) running the data-parallel and collectives scenarios."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    for name in DIST_VARS:
        env.pop(name, None)
    code = (
        "import sys\nfrom sdlora_dist.jobs.launch import LaunchSpec, launch\n"
        "sys.exit(launch(LaunchSpec(nodes=1, procs_per_node=2, launcher='local'), "
        f"[sys.executable, '-m', 'dist_worker_toy', 'dp,collectives', '--out', {str(out)!r}, '--timeout', '60']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_data_parallel_steps_equal_single_process_steps(two_rank_job, single_process):
    import dist_worker_toy as toy

    ranks = [torch.load(two_rank_job / f"dp_rank{r}.pt") for r in (0, 1)]
    initial = {n: p.detach() for n, p in toy.make_model().named_parameters()}
    for opt in ("sgd", "adamw"):
        reference = toy.train(opt, 3, rank=0, world=1)  # whole batch, one rank, same engine code
        assert reference.keys() == ranks[0][opt].keys() and len(reference) == 5
        for name, ref in reference.items():
            assert torch.equal(ranks[0][opt][name], ranks[1][opt][name]), (opt, name)
            diff = (ranks[0][opt][name] - ref).abs().max().item()
            assert diff <= 1e-5, (opt, name, diff)
            # The comparison is not vacuous: three steps moved every trainable tensor.
            assert (ref - initial[name]).abs().max().item() > 1e-4, (opt, name)


@pytest.mark.slow
def test_collectives_across_two_ranks(two_rank_job):
    records = [json.loads((two_rank_job / f"collectives_rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert rec["obj"] == {"from": 0, "payload": [0, 0, 0]}  # rank 0's object everywhere
        assert rec["tensor"] == [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]  # src=1, non-contiguous target
        assert rec["sum"] == 3.0
        assert rec["gathered"] == ["r0", "r1"]
        # Every rank raises (no rank is left waiting), naming the rank that differs.
        assert rec["error"] is not None
        assert "adapter checksum: ranks [1] disagree with rank 0" in rec["error"]
        assert "state-of-0" in rec["error"] and "state-of-1" in rec["error"]
        # stored statistics only rank 0's node can see: read there, the same tensors (dtype too) on every rank
        assert rec["read"] == {"sums": ["torch.float64", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]],
                               "count": ["torch.int64", [4, 5]]}  # fmt: skip
        assert rec["read_error"] == "task 0 of RUN has no ridge head statistics; keep the run's settings"
        assert rec["read_nothing"] is None


@pytest.mark.slow
def test_stalled_rank_ends_survivor_within_timeout(tmp_path, worker_env):
    """A rank that stops answering (SIGSTOP: alive, connections open) must not hang the others past the timeout."""
    timeout_s = 5
    port = free_port()
    procs = []
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(port)
        cmd = [sys.executable, "-m", "dist_worker_toy", "hang", "--out", str(tmp_path), "--timeout", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"hang_rank{r}.pid").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = procs[0].communicate(timeout=timeout_s + 30)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode != 0
    assert elapsed <= timeout_s + 10, elapsed
    assert "error: rank 0/2: collective 'all_reduce_sum' failed" in out  # one line, run by hand
    assert "process-group timeout (5 s)" in out
