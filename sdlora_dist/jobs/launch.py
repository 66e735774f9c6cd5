"""Turn ``--nodes/--gpus-per-node/--hostfile/--launcher`` into the command that starts every rank of the worker.

Launchers (``--launcher``):

* ``local``: one node, N processes under ``torch.distributed.run`` (torchrun). Its agent watches the ranks: when
  one dies (even by ``kill -9``) it stops the others and exits non-zero, naming the failed rank.
* ``deepspeed``: DeepSpeed's multinode runner over a hostfile (pdsh/ssh to each host), or, with ``--no-ssh``,
  started on each node by its own scheduler with ``--node-rank``.
* ``slurm``: ``srun`` inside an allocation, one task per rank, the step killed when any task fails.
* ``env``: the environment already set RANK/WORLD_SIZE (torchrun, srun, Kubernetes): run the worker directly.
* ``auto``: ``env`` when RANK and WORLD_SIZE are set, ``slurm`` for several nodes inside a SLURM job, ``local``
  for one node, ``deepspeed`` for several nodes with a hostfile.

A rank that dies on another node is noticed by the survivors through the process-group timeout
(``train.timeout_s``): their collectives fail and their launcher exits non-zero.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdlora_dist.errors import UserError
from sdlora_dist.jobs import ranklog
from sdlora_dist.jobs.rank import global_rank
from sdlora_dist.jobs.slurm import first_slurm_host

LAUNCHERS = ("auto", "local", "deepspeed", "slurm", "env")
DEFAULT_MASTER_PORT = 29500


@dataclass
class LaunchSpec:
    """Where and how many ranks to start; mirrors the ``sdlora train`` launch options.

    ``master_addr`` None means: 127.0.0.1 for one node, the first SLURM node under SLURM, and for the DeepSpeed
    runner over ssh the address the first hostfile host reports. ``master_port`` None means a free port chosen by
    torchrun on one node, 29500 otherwise.
    """

    nodes: int = 1
    procs_per_node: int = 1
    launcher: str = "auto"
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None
    no_ssh: bool = False


def _validate(spec: LaunchSpec) -> None:
    if spec.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)} (got {spec.launcher!r})")
    if spec.nodes < 1:
        raise UserError(f"--nodes must be >= 1 (got {spec.nodes})")
    if spec.procs_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1 (got {spec.procs_per_node})")
    if spec.master_port is not None and not 1 <= spec.master_port <= 65535:
        raise UserError(f"--master-port must be in 1..65535 (got {spec.master_port})")
    if spec.node_rank is not None and not 0 <= spec.node_rank < spec.nodes:
        raise UserError(f"--node-rank must be in [0, {spec.nodes}) for --nodes {spec.nodes} (got {spec.node_rank})")


_MULTI_NODE_HELP = (
    "pass --hostfile FILE (DeepSpeed runner; add --no-ssh --node-rank I --master-addr ADDR to start each node "
    "yourself), run inside a SLURM allocation (sbatch/salloc), or use --launcher env where RANK/WORLD_SIZE are "
    "already set (torchrun, srun, Kubernetes)"
)


def resolve_launcher(spec: LaunchSpec, environ: Mapping[str, str] = os.environ) -> str:
    """The concrete launcher for ``spec`` (``auto`` resolved from the environment); UserError when none fits."""
    _validate(spec)
    launcher = spec.launcher
    if launcher == "auto":
        if "RANK" in environ and "WORLD_SIZE" in environ:
            launcher = "env"
        elif spec.nodes > 1 and "SLURM_JOB_ID" in environ:
            launcher = "slurm"
        elif spec.nodes == 1 and not spec.no_ssh:
            launcher = "local"
        elif spec.hostfile:
            launcher = "deepspeed"
        else:
            raise UserError(f"--nodes {spec.nodes} needs a way to reach the other nodes: {_MULTI_NODE_HELP}")
    if launcher == "local" and spec.nodes > 1:
        raise UserError(f"--launcher local runs on one node (got --nodes {spec.nodes}): {_MULTI_NODE_HELP}")
    if launcher == "deepspeed" and not spec.hostfile:
        raise UserError(
            "--launcher deepspeed needs --hostfile FILE with one line per node, e.g. 'node-1 slots=8' "
            "(with --no-ssh too: it defines the node order that --node-rank indexes)"
        )
    if spec.no_ssh and launcher != "deepspeed":
        raise UserError(f"--no-ssh applies to the DeepSpeed runner only (got --launcher {launcher}); pass --hostfile")
    if spec.no_ssh and spec.node_rank is None:
        raise UserError("--no-ssh starts one node per command: pass --node-rank I (0 on the master node)")
    if spec.no_ssh and not spec.master_addr:
        raise UserError("--no-ssh needs --master-addr ADDR, the address of node 0 reachable from every node")
    return launcher


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _split_worker(worker_argv: list[str]) -> tuple[str, list[str]]:
    """Classify the worker command: ('module', [mod, *args]), ('script', [path, *args]) or ('exec', argv)."""
    if not worker_argv:
        raise ValueError("worker_argv is empty")
    exe = Path(worker_argv[0]).name
    if exe.startswith("python") or worker_argv[0] == sys.executable:
        if len(worker_argv) >= 3 and worker_argv[1] == "-m":
            return "module", worker_argv[2:]
        if len(worker_argv) >= 2 and not worker_argv[1].startswith("-"):
            return "script", worker_argv[1:]
    return "exec", list(worker_argv)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """Hosts and slots of a DeepSpeed/MPI-style hostfile (``host slots=N`` per line, # comments)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"hostfile {path} does not exist: pass a file with one 'HOST slots=N' line per node")
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UserError(f"hostfile {path} line {number}: expected 'HOST slots=N' (got {raw.strip()!r})")
        if any(host == parts[0] for host, _ in hosts):
            raise UserError(f"hostfile {path} line {number}: host {parts[0]!r} is listed twice")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts: add one 'HOST slots=N' line per node")
    return hosts


def _local_command(spec: LaunchSpec, worker_argv: list[str]) -> list[str]:
    kind, rest = _split_worker(worker_argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={spec.procs_per_node}"]
    if spec.master_port is None:
        cmd.append("--standalone")  # rendezvous on a free local port
    else:
        cmd += [f"--master-addr={spec.master_addr or '127.0.0.1'}", f"--master-port={spec.master_port}"]
    cmd += ["--max-restarts=0", "--monitor-interval=0.5"]
    cmd += {"module": ["-m"], "script": [], "exec": ["--no-python"]}[kind]
    return cmd + rest


def _deepspeed_command(spec: LaunchSpec, worker_argv: list[str]) -> list[str]:
    assert spec.hostfile is not None  # resolve_launcher guarantees it
    hosts = read_hostfile(spec.hostfile)
    if len(hosts) < spec.nodes:
        raise UserError(f"--nodes {spec.nodes} but hostfile {spec.hostfile} lists only {len(hosts)} host(s)")
    kind, rest = _split_worker(worker_argv)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={spec.hostfile}"]
    cmd += [f"--num_nodes={spec.nodes}", f"--num_gpus={spec.procs_per_node}"]
    if spec.master_addr:
        cmd.append(f"--master_addr={spec.master_addr}")
    cmd += [f"--master_port={spec.master_port or DEFAULT_MASTER_PORT}", "--no_local_rank", "--log_level=warning"]
    if spec.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={spec.node_rank}"]
    cmd += {"module": ["--module"], "script": [], "exec": ["--no_python"]}[kind]
    return cmd + rest


def _slurm_command(spec: LaunchSpec, worker_argv: list[str], environ: Mapping[str, str]) -> tuple[list[str], dict]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    master = spec.master_addr or (first_slurm_host(nodelist) if nodelist else None)
    if master is None:
        raise UserError("--launcher slurm outside an allocation: pass --master-addr or run inside sbatch/salloc")
    cmd = ["srun", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.procs_per_node}", "--kill-on-bad-exit=1"]
    env = {"MASTER_ADDR": master, "MASTER_PORT": str(spec.master_port or DEFAULT_MASTER_PORT)}
    return cmd + list(worker_argv), env


def build_command(
    spec: LaunchSpec, worker_argv: list[str], environ: Mapping[str, str] = os.environ
) -> tuple[list[str], dict[str, str]]:
    """The exact argv that starts every rank of ``worker_argv`` on this node, and the env vars to add.

    ``worker_argv`` is one rank's command, e.g. ``[sys.executable, "-m", "sdlora_dist.jobs.worker", "--run-dir", D]``.
    """
    launcher = resolve_launcher(spec, environ)
    if launcher == "env":
        return list(worker_argv), {}
    if launcher == "slurm":
        return _slurm_command(spec, worker_argv, environ)
    if launcher == "deepspeed":
        return _deepspeed_command(spec, worker_argv), {}
    extra = {}
    if "OMP_NUM_THREADS" not in environ:
        # Ranks on one CPU node share its cores; torchrun would otherwise force 1 thread each.
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.procs_per_node))
    return _local_command(spec, worker_argv), extra


def format_command(argv: list[str], extra_env: Mapping[str, str]) -> str:
    """One shell line (``--dry-run`` output): env assignments, then the quoted argv."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in extra_env.items()] + [shlex.quote(a) for a in argv])


def _check_tools(argv: list[str], spec: LaunchSpec, launcher: str) -> None:
    if launcher == "slurm" and shutil.which("srun") is None:
        raise UserError("--launcher slurm but srun is not on PATH: run on a SLURM login/compute node")
    if launcher == "deepspeed" and not spec.no_ssh and shutil.which("pdsh") is None:
        raise UserError(
            "the DeepSpeed runner reaches other nodes through pdsh, which is not installed: install pdsh, or start "
            "each node yourself with --no-ssh --node-rank I --master-addr ADDR, or use SLURM"
        )


def _own_ranks(spec: LaunchSpec, launcher: str) -> range:
    """Global ranks this node's launcher starts (the first one's log is echoed to the console)."""
    if launcher == "env":
        rank = global_rank()  # what the worker started here will name its log by
        return range(rank, rank + 1)
    if spec.no_ssh:
        first = (spec.node_rank or 0) * spec.procs_per_node
        return range(first, first + spec.procs_per_node)
    return range(spec.nodes * spec.procs_per_node)


def _start(argv: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    """Start the launcher; it gets SIGTERM if we die (even by ``kill -9``), and so, in turn, do its ranks.

    Linux ties the parent-death signal to the thread that forked: the caller's thread must outlive the launcher
    (``launch`` waits for it in the same thread, so it does).
    """
    me = os.getpid()

    def die_with_us() -> None:
        ranklog.die_with_parent(signal.SIGTERM, parent=me)

    if log is None:
        return subprocess.Popen(argv, env=env, preexec_fn=die_with_us)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_us)


def launch(spec: LaunchSpec, worker_argv: list[str], run_dir: str | Path | None = None) -> int:
    """Run the launcher command; return its exit code (non-zero if any rank failed).

    With ``run_dir`` (what ``sdlora train`` does) the launcher's own output goes to ``RUN_DIR/logs/launcher.log``,
    each rank logs to ``RUN_DIR/logs/rank_N.log``, the console shows this node's first rank, and a failure ends in
    one line naming the rank, its host and its error, with exit code 2 (user error), 130 (Ctrl-C) or 1.
    """
    argv, extra_env = build_command(spec, worker_argv)
    launcher = resolve_launcher(spec)
    _check_tools(argv, spec, launcher)
    env = {**os.environ, **extra_env, ranklog.FRONTDOOR_ENV: f"{socket.gethostname()}:{os.getpid()}"}
    echo = log = None
    ranks = range(0)
    if run_dir is not None:
        logs = Path(run_dir) / ranklog.LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        ranks = _own_ranks(spec, launcher)
        ranklog.clear_records(run_dir, ranks)
        log = logs / ("launcher.log" if ranks[0] == 0 else f"launcher_rank{ranks[0]}.log")
        echo = ranklog.LogEcho(ranklog.log_path(run_dir, ranks[0]))
    else:
        env.pop(ranklog.FRONTDOOR_ENV)
    code, stopped_by = _wait(_start(argv, env, log), launcher)
    if stopped_by is not None and threading.current_thread() is threading.main_thread():
        # The job is over: a further Ctrl-C (a copy that arrives late on a loaded machine) must not turn the exit
        # code we report (130, 143) into death by signal between our last line and the exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if echo is not None:
        echo.stop()
    if code == 0:
        return 0
    if run_dir is None:
        print(f"error: the training job failed (launcher exit code {code})", file=sys.stderr, flush=True)
        return code
    line, code = ranklog.summarize(run_dir, code, stopped_by, ours=ranks)
    print(line, file=sys.stderr, flush=True)
    return code


STOP_GRACE_S = 10.0  # after Ctrl-C is passed on, what is still running this much later is killed
# After SIGTERM (preemption): time for every rank to finish its step and write an engine checkpoint, under the 30 s
# a scheduler waits by default (SLURM KillWait, Kubernetes terminationGracePeriodSeconds) before its SIGKILL.
PREEMPT_GRACE_S = 25.0


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it (ranks, their data workers)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _ranks_of(proc: subprocess.Popen, launcher: str) -> list:
    """Where a SIGTERM is passed on: the local ranks for torchrun (the launcher would kill them with SIGKILL when a
    second SIGTERM reached it during its shutdown), the launcher itself otherwise (srun, the DeepSpeed runner)."""
    import psutil

    try:
        return psutil.Process(proc.pid).children() if launcher == "local" else [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return []


def _pass_on(proc: subprocess.Popen, signum: int, launcher: str) -> None:
    """Send ``signum`` to the launcher (Ctrl-C) or, for SIGTERM, to what :func:`_ranks_of` names."""
    import psutil

    if signum != signal.SIGTERM:
        proc.send_signal(signum)
        return
    for process in _ranks_of(proc, launcher):
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _wait(proc: subprocess.Popen, launcher: str = "local") -> tuple[int, str | None]:
    """Wait for the launcher, passing Ctrl-C and SIGTERM on; (exit code, name of the signal that stopped us).

    A rank blocked inside a collective (C++ code) runs no Python signal handler until the collective returns, and
    the launcher waits 30 s before it kills such a rank. So once a stop was passed on, the launcher's whole process
    tree is killed after ``STOP_GRACE_S`` (Ctrl-C) or ``PREEMPT_GRACE_S`` (SIGTERM: the ranks finish their step and
    checkpoint first, see ``jobs.preempt``); a second SIGTERM kills it at once. SIGTERM copies closer than
    ``preempt.DUPLICATE_S`` to the first (a scheduler signals every process of the job) count as one.
    """
    from sdlora_dist.jobs import preempt

    stopped_by: list[str] = []
    deadline: list[float] = []
    first_term: list[float] = []

    def forward(signum: int, frame: object) -> None:
        now = time.monotonic()
        if signum == signal.SIGTERM and first_term:
            if now - first_term[0] >= preempt.DUPLICATE_S:
                _kill_tree(proc)  # a second SIGTERM: stop at once
            return
        if signum == signal.SIGTERM:
            first_term.append(now)
        stopped_by.append(signal.Signals(signum).name)
        if not deadline:
            deadline.append(now + (PREEMPT_GRACE_S if signum == signal.SIGTERM else STOP_GRACE_S))
        _pass_on(proc, signum, launcher)

    previous = None
    if threading.current_thread() is threading.main_thread():
        # A scheduler stopping us with SIGTERM must stop the ranks too, not orphan them.
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait(timeout=max(0.0, deadline[0] - time.monotonic()) if deadline else None)
                break
            except subprocess.TimeoutExpired:
                _kill_tree(proc)  # the grace period is over
                deadline[:] = [float("inf")]
            except KeyboardInterrupt:  # a second Ctrl-C while the ranks stop is passed on too
                forward(signal.SIGINT, None)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    return code, (stopped_by[0] if stopped_by else None)


__all__ = [
    "LaunchSpec",
    "LAUNCHERS",
    "resolve_launcher",
    "build_command",
    "format_command",
    "launch",
    "read_hostfile",
]
