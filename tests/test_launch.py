"""The launcher: which launcher runs, the exact commands (``--dry-run``), and real multi-process launches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdlora_dist.errors import UserError
from sdlora_dist.jobs.launch import (
    LaunchSpec,
    build_command,
    format_command,
    launch,
    resolve_launcher,
)
from sdlora_dist.jobs.slurm import first_slurm_host

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker_toy import free_port  # noqa: E402  (tests/ is not a package)

TESTS = Path(__file__).resolve().parent
PY = sys.executable
WORKER = [PY, "-m", "sdlora_dist.jobs.worker", "--run-dir", "runs/x"]


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8  # second\n")
    return path


@pytest.fixture
def worker_env(monkeypatch):
    """The ranks import the toy worker as a module (``python -m dist_worker_toy``), like the training worker."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------------------------
# Choosing the launcher


def test_auto_launcher_follows_the_environment(hostfile):
    one, two = LaunchSpec(nodes=1, procs_per_node=2), LaunchSpec(nodes=2, procs_per_node=8)
    assert resolve_launcher(one, {}) == "local"
    assert resolve_launcher(two, {"RANK": "3", "WORLD_SIZE": "16"}) == "env"
    assert resolve_launcher(two, {"SLURM_JOB_ID": "77"}) == "slurm"
    assert resolve_launcher(one, {"SLURM_JOB_ID": "77"}) == "local"  # one node inside an allocation
    assert resolve_launcher(LaunchSpec(nodes=2, hostfile=str(hostfile)), {}) == "deepspeed"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LaunchSpec(nodes=2), r"--nodes 2 needs a way to reach the other nodes: pass --hostfile FILE .* SLURM"),
        (LaunchSpec(nodes=2, launcher="local"), r"--launcher local runs on one node \(got --nodes 2\)"),
        (LaunchSpec(launcher="deepspeed"), r"--launcher deepspeed needs --hostfile"),
        (LaunchSpec(launcher="mpi"), r"--launcher must be one of auto, local, deepspeed, slurm, env \(got 'mpi'\)"),
        (LaunchSpec(nodes=0), r"--nodes must be >= 1 \(got 0\)"),
        (LaunchSpec(procs_per_node=0), r"--gpus-per-node must be >= 1"),
        (LaunchSpec(nodes=2, node_rank=2, hostfile="h"), r"--node-rank must be in \[0, 2\)"),
        (LaunchSpec(nodes=2, hostfile="h", no_ssh=True, master_addr="10.0.0.1"), r"pass --node-rank I"),
        (LaunchSpec(nodes=2, hostfile="h", no_ssh=True, node_rank=1), r"--no-ssh needs --master-addr"),
        (LaunchSpec(launcher="slurm", no_ssh=True, node_rank=0), r"--no-ssh applies to the DeepSpeed runner only"),
        (LaunchSpec(master_port=70000), r"--master-port must be in 1..65535"),
    ],
)
def test_bad_launch_options_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        resolve_launcher(spec, {})


def test_hostfile_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hostfile .*missing does not exist"):
        build_command(LaunchSpec(nodes=2, hostfile=str(tmp_path / "missing")), WORKER, {})
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=8\nnode-b 8\n")
    with pytest.raises(UserError, match=r"line 2: expected 'HOST slots=N' \(got 'node-b 8'\)"):
        build_command(LaunchSpec(nodes=2, hostfile=str(bad)), WORKER, {})
    small = tmp_path / "small"
    small.write_text("node-a slots=8\n")
    with pytest.raises(UserError, match="--nodes 2 but hostfile .* lists only 1 host"):
        build_command(LaunchSpec(nodes=2, hostfile=str(small)), WORKER, {})


# --------------------------------------------------------------------------------------------------------------------
# The exact commands (what --dry-run prints)


def test_dry_run_hostfile_uses_the_deepspeed_multinode_runner(hostfile):
    spec = LaunchSpec(nodes=2, procs_per_node=8, hostfile=str(hostfile), master_addr="10.1.2.3", master_port=29600)
    argv, env = build_command(spec, WORKER, {})
    assert argv == [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--num_nodes=2",
        "--num_gpus=8",
        "--master_addr=10.1.2.3",
        "--master_port=29600",
        "--no_local_rank",
        "--log_level=warning",
        "--module",
        "sdlora_dist.jobs.worker",
        "--run-dir",
        "runs/x",
    ]
    assert env == {}
    assert format_command(argv, env) == (
        f"{PY} -m deepspeed.launcher.runner --hostfile={hostfile} --num_nodes=2 --num_gpus=8 "
        "--master_addr=10.1.2.3 --master_port=29600 --no_local_rank --log_level=warning --module "
        "sdlora_dist.jobs.worker --run-dir runs/x"
    )
    # Without --master-addr the runner asks the first host for its address; --no-ssh starts one node.
    argv, _ = build_command(LaunchSpec(nodes=2, hostfile=str(hostfile)), WORKER, {})
    assert not any(a.startswith("--master_addr") for a in argv) and "--master_port=29500" in argv
    spec = LaunchSpec(nodes=2, hostfile=str(hostfile), no_ssh=True, node_rank=1, master_addr="10.1.2.3")
    argv, _ = build_command(spec, WORKER, {})
    assert argv[argv.index("--no_ssh") + 1] == "--node_rank=1"


def test_dry_run_slurm_uses_srun_with_rendezvous_on_the_first_node():
    environ = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[012-015],gpu020"}
    argv, env = build_command(LaunchSpec(nodes=4, procs_per_node=8), WORKER, environ)
    assert argv == ["srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1", *WORKER]
    assert env == {"MASTER_ADDR": "gpu012", "MASTER_PORT": "29500"}
    assert format_command(argv, env) == (
        f"MASTER_ADDR=gpu012 MASTER_PORT=29500 srun --nodes=4 --ntasks-per-node=8 --kill-on-bad-exit=1 {PY} -m "
        "sdlora_dist.jobs.worker --run-dir runs/x"
    )
    argv, env = build_command(LaunchSpec(nodes=2, master_addr="head", master_port=3000), WORKER, environ)
    assert env == {"MASTER_ADDR": "head", "MASTER_PORT": "3000"}


def test_dry_run_local_and_env():
    argv, env = build_command(LaunchSpec(nodes=1, procs_per_node=4), WORKER, {"OMP_NUM_THREADS": "4"})
    assert argv == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--standalone",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "-m",
        "sdlora_dist.jobs.worker",
        "--run-dir",
        "runs/x",
    ]
    assert env == {}
    _, env = build_command(LaunchSpec(nodes=1, procs_per_node=2), WORKER, {})
    assert env == {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    argv, _ = build_command(LaunchSpec(master_port=1234), ["/opt/bin/worker", "-x"], {})
    assert argv[5:] == [
        "--master-addr=127.0.0.1",
        "--master-port=1234",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "--no-python",
        "/opt/bin/worker",
        "-x",
    ]
    assert build_command(LaunchSpec(nodes=8), WORKER, {"RANK": "0", "WORLD_SIZE": "64"}) == (WORKER, {})


def test_first_slurm_host():
    assert first_slurm_host("gpu[003-010,020],cpu1") == "gpu003"
    assert first_slurm_host("a1,b2") == "a1"
    assert first_slurm_host("node[7]-ib") == "node7-ib"


# --------------------------------------------------------------------------------------------------------------------
# Real launches (2 gloo processes)


@pytest.mark.slow
def test_two_nodes_on_localhost_apply_rank0_decision(tmp_path, worker_env):
    """Two "nodes" on 127.0.0.1, one process each, started like two schedulers would start them (--no-ssh)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    port = free_port()
    worker = [PY, "-m", "dist_worker_toy", "decide", "--out", str(out), "--timeout", "60"]
    codes: dict[int, int] = {}

    def node(rank: int) -> None:
        spec = LaunchSpec(
            nodes=2,
            procs_per_node=1,
            hostfile=str(hosts),
            master_addr="127.0.0.1",
            master_port=port,
            node_rank=rank,
            no_ssh=True,
        )
        assert resolve_launcher(spec) == "deepspeed"
        codes[rank] = launch(spec, worker)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert codes == {0: 0, 1: 0}
    records = [json.loads((out / f"decide_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in records] == [
        (0, 0, 0, 2),
        (1, 1, 0, 2),
    ]
    # Rank 1 drew its own random decision but applied rank 0's: same decision, same tensor, same checksum.
    assert records[0]["decision"] == records[1]["decision"]
    assert records[0]["delta_sum"] == records[1]["delta_sum"]
    assert records[0]["checksum"] == records[1]["checksum"]


def _launch_in_child(spec: str, worker: list[str], run_dir: Path) -> subprocess.Popen:
    """``launch(spec, worker, run_dir)`` in its own interpreter (the front door), output captured."""
    code = (
        "import sys\nfrom sdlora_dist.jobs.launch import LaunchSpec, launch\n"
        f"sys.exit(launch(LaunchSpec({spec}), {worker!r}, run_dir={str(run_dir)!r}))"
    )
    return subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_pids(folder: Path, job: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 120
    while not all((folder / f"hang_rank{r}.pid").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and job.poll() is None, "ranks did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    return [int((folder / f"hang_rank{r}.pid").read_text()) for r in (0, 1)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (its parent, the test's grandchild, may not have reaped it yet)
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_job_with_one_line_naming_it(tmp_path, worker_env):
    timeout_s = 20
    worker = [PY, "-m", "dist_worker_toy", "hang", "--out", str(tmp_path), "--timeout", str(timeout_s)]
    job = _launch_in_child("nodes=1, procs_per_node=2, launcher='local'", worker, tmp_path)
    try:
        pids = _wait_for_pids(tmp_path, job)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        out, _ = job.communicate(timeout=timeout_s + 30)
        elapsed = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 1, out
    assert elapsed <= timeout_s, elapsed
    # One line, naming the rank that died first and its host; torchrun's report stays in the launcher log.
    host = socket.gethostname()
    assert out.splitlines() == [
        f"error: rank 1 on {host}: died without an error (pid {pids[1]} was killed, e.g. by kill -9 or out of "
        f"memory) (full log: {tmp_path}/logs/rank_1.log)"
    ], out
    assert "Root Cause" in (tmp_path / "logs" / "launcher.log").read_text()


@pytest.mark.slow
def test_user_error_on_rank_1_only_is_one_line_with_exit_2(tmp_path, worker_env):
    worker = [PY, "-m", "dist_worker_toy", "user_error_rank1", "--out", str(tmp_path), "--timeout", "30"]
    job = _launch_in_child("nodes=1, procs_per_node=2, launcher='local'", worker, tmp_path)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 2, out
    assert out.splitlines() == [
        f"error: rank 1 on {socket.gethostname()}: shard {tmp_path}/bad.tar is damaged (toy): re-create it with "
        f"'sdlora data prepare' (full log: {tmp_path}/logs/rank_1.log)"
    ], out
    # The full story is in the logs: rank 1's traceback, rank 0's failed collective, torchrun's report.
    assert "UserError" in (tmp_path / "logs" / "rank_1.log").read_text()
    assert "RankFailure" in (tmp_path / "logs" / "rank_0.log").read_text()
    assert "ChildFailedError" in (tmp_path / "logs" / "launcher.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "deepspeed"])
def test_kill_9_of_the_launcher_leaves_no_live_rank(tmp_path, worker_env, launcher):
    """The front door dies without a word; torchrun / the DeepSpeed runner and both ranks must follow it."""
    worker = [PY, "-m", "dist_worker_toy", "hang", "--out", str(tmp_path), "--timeout", "60"]
    spec = "nodes=1, procs_per_node=2, launcher='local'"
    if launcher == "deepspeed":
        hosts = tmp_path / "hosts"
        hosts.write_text("localhost slots=2\n")
        spec = (
            f"nodes=1, procs_per_node=2, launcher='deepspeed', hostfile={str(hosts)!r}, no_ssh=True, node_rank=0, "
            f"master_addr='127.0.0.1', master_port={free_port()}"
        )
    job = _launch_in_child(spec, worker, tmp_path)
    try:
        pids = _wait_for_pids(tmp_path, job)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [p for p in pids if _alive(p)]
    finally:
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert survivors == []


@pytest.mark.slow
def test_a_stop_kills_ranks_that_ignore_it_after_the_grace_period(tmp_path, worker_env):
    """Ctrl-C reaches ranks that cannot act on it (blocked in C++): the front door still ends the job, every rank
    included, within STOP_GRACE_S (torchrun alone would wait 30 s), with the Ctrl-C exit code."""
    from sdlora_dist.jobs.launch import STOP_GRACE_S

    worker = [PY, "-m", "dist_worker_toy", "deaf", "--out", str(tmp_path), "--timeout", "60"]
    job = _launch_in_child("nodes=1, procs_per_node=2, launcher='local'", worker, tmp_path)
    try:
        pids = _wait_for_pids(tmp_path, job)
        sent = time.monotonic()
        os.kill(job.pid, signal.SIGINT)
        out, _ = job.communicate(timeout=60)
        elapsed = time.monotonic() - sent
        survivors = [p for p in pids if _alive(p)]
    finally:
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode == 130, out[-2000:]
    assert STOP_GRACE_S <= elapsed < STOP_GRACE_S + 8 and survivors == [], (elapsed, survivors)
