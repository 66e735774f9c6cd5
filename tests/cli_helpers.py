"""What the tests that run the real CLI share: tiny training settings, the subprocess runner, a kill at a mid-task
engine checkpoint, and the one ``error:`` line a user's mistake must produce."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# a 2-block ViT on 16 px digits, a few steps per task: seconds per task on one CPU core
TINY = [
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "adapter.rank=4",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "train.epochs=1",
    "train.lr=0.01",
    "train.max_steps_per_epoch=6",
    "train.timeout_s=60",
    "train.ridge_dim=128",  # the default ridge head at a width in proportion to this ViT's 32 (default 1024)
]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "sdlora_dist.cli.main"]


def sets(*extra: str) -> list[str]:
    """``--set`` arguments for TINY then ``extra`` (a later setting of the same key wins)."""
    return [arg for item in [*TINY, *extra] for arg in ("--set", item)]


def sdlora(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (each run owns its process group and DeepSpeed state)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def kill_at_engine_checkpoint(args: list[str], run_dir: Path, task: int, timeout: float = 240) -> None:
    """Start ``sdlora ARGS`` in its own session and SIGKILL its whole process group as soon as task ``task`` has
    written its first mid-task engine checkpoint (a crash between steps)."""
    proc = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    engine_dir = run_dir / "engine" / f"task_{task:02d}"
    deadline = time.time() + timeout
    while time.time() < deadline and not (engine_dir.is_dir() and any(engine_dir.glob("step_*"))):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``sdlora ARGV`` in this process: (exit code, stdout, stderr)."""
    from sdlora_dist.cli.main import main

    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The one ``error: ...`` line of ``err`` (fails unless there is exactly one)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def cli(*args: str) -> tuple[int, str, str]:
    """``sdlora ARGS`` in this process with its output captured: (exit code, stdout, stderr)."""
    from sdlora_dist.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()
