"""Faults across processes with the real trainer (digits shards, 2 gloo ranks): one line, the right exit code,
no orphan rank, one job per run directory, and resume on fewer ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import CLI, ENV, sdlora
from cli_helpers import sets as tiny_sets


def sets(*extra: str) -> list[str]:
    """The tiny settings with two steps per task (the faults come early), then ``extra``."""
    return tiny_sets("train.max_steps_per_epoch=2", *extra)


def start(*args: str) -> subprocess.Popen:
    """``sdlora ...`` in its own session (like a terminal job), output captured."""
    return subprocess.Popen(
        [*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """digits in 2 tasks: a finished run costs 2 tasks."""
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("shards") / "digits2"
    prepare("digits", None, out, tasks=2, progress=False)
    return out


def ranks_running(run_dir: Path, n: int = 2) -> list[int]:
    """Pids of the ranks once all ``n`` have recorded themselves as running (waits)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        records = [run_dir / "logs" / f"rank_{r}.json" for r in range(n)]
        if all(p.exists() and p.stat().st_size for p in records):
            data = [json.loads(p.read_text()) for p in records]
            if all(d["status"] == "running" for d in data):
                return [d["pid"] for d in data]
        time.sleep(0.1)
    raise AssertionError("ranks did not start")


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_second_job_is_refused_kill_9_of_launcher_leaves_no_rank_and_resume_on_one_rank(shards, tmp_path):
    run_dir = tmp_path / "run"
    extra = sets("train.max_steps_per_epoch=100", "train.epochs=20", "train.checkpoint_every=5")
    job = start("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                *extra)  # fmt: skip
    try:
        pids = ranks_running(run_dir)
        host = socket.gethostname()
        # A second job on the running run: --resume, and a fresh start on the same --run-dir.
        for args in (["--resume", str(run_dir)], ["-b", "digits", "--data", str(shards), "--run-dir", str(run_dir)]):
            second = sdlora("train", *args, "--gpus-per-node", "2")
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and f"is in use by another job (host {host}, pid {job.pid}, " in lines[0], lines
        # Let task 0 finish and task 1 write an engine checkpoint, then kill -9 the front door.
        engine_dir = run_dir / "engine" / "task_01"
        deadline = time.monotonic() + 240
        while not (engine_dir.is_dir() and any(engine_dir.glob("step_*"))):
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in pids if alive(p)] == []
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    # The lock of the dead front door is stale (its pid is gone): a resume on ONE rank takes over and finishes,
    # restoring task 0 from its checkpoint and task 1 mid-task from the 2-rank engine checkpoint.
    resumed = sdlora("train", "--resume", str(run_dir), "--gpus-per-node", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from engine checkpoint" in resumed.stderr
    tasks = json.loads((run_dir / "metrics.json").read_text())["tasks"]
    assert [t["world_size"] for t in tasks] == [2, 1]
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_continue_on_a_finished_moved_run_is_one_line_naming_it(shards, tmp_path):
    first = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(tmp_path / "run"), *sets())
    assert first.returncode == 0, first.stderr[-3000:]
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    out = sdlora("train", "--continue", str(moved), "--gpus-per-node", "2")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: rank 0 on {socket.gethostname()}: --continue {moved}: all 2 task(s) ")
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_ctrl_c_of_a_two_rank_run_is_one_line_and_exit_130(shards, tmp_path):
    run_dir = tmp_path / "run"
    job = start("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                *sets("train.max_steps_per_epoch=100", "train.epochs=20"))  # fmt: skip
    pids = ranks_running(run_dir)
    time.sleep(3)
    os.killpg(job.pid, signal.SIGINT)  # what a terminal sends to its foreground job
    sent = time.monotonic()
    _, err = job.communicate(timeout=120)
    elapsed = time.monotonic() - sent
    assert job.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: interrupted (Ctrl-C); resume with: sdlora train --resume {run_dir}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert elapsed < 30 and not [p for p in pids if alive(p)]


@pytest.mark.slow
def test_unsafe_pickle_as_weights_is_one_line_and_runs_nothing(shards, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'w': Evil()}}, {str(evil)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import timm

    from sdlora_dist.errors import UserError
    from sdlora_dist.model import load_backbone_weights

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1)
    with pytest.raises(UserError) as err:
        load_backbone_weights(backbone, evil)
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message
    assert message.startswith(f"model.weights: {evil} is a pickle that holds more than tensors")
    assert not marker.exists()
    out = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(tmp_path / "run"),
                 *sets(f"model.weights={evil}"))  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: {message}"], out.stderr
    assert not marker.exists()
