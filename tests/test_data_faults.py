"""Faults at prepare time, through the real CLI: Ctrl-C with worker processes, a damaged shard set, bad layouts.

Each test pins a failure seen in issue 10 and fails without its fix.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_image_folder
from PIL import Image

from sdlora_dist.cli.main import main
from sdlora_dist.data import load_manifest

CLI = [sys.executable, "-m", "sdlora_dist.cli.main"]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _big_folder(root: Path, n_classes: int = 4, per_class: int = 60) -> None:
    """Smooth 900x700 PNGs: cheap to write, slow enough to decode, resize and re-encode that prepare takes a while."""
    y, x = np.mgrid[0:700, 0:900]
    for c in range(n_classes):
        for i in range(per_class):
            split, index = ("test", i) if i % 5 == 0 else ("train", i)
            pixels = np.stack([(x + 7 * i) % 256, (y + 11 * c) % 256, (x + y + i) % 256], axis=2).astype(np.uint8)
            path = root / split / f"c{c}" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, compress_level=1)


def _live(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ctrl_c_with_workers_exits_130_at_once_and_resumes(tmp_path: Path) -> None:
    _big_folder(tmp_path / "src")
    out, stage = tmp_path / "out", tmp_path / "out.partial"
    argv = [*CLI, "data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"), "--out", str(out),
            "--tasks", "2", "--workers", "2", "--shard-size", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own process group, like a shell's foreground job: Ctrl-C reaches the main process and every worker
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(stage.rglob(".*.done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted: make the source bigger"
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("data prepare still running 5 s after Ctrl-C")
    elapsed = time.monotonic() - sent
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and elapsed < 5, (proc.returncode, elapsed, err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: data prepare stopped"), err
    assert "Traceback" not in err and "ForkPoolWorker" not in err
    time.sleep(0.5)
    assert not _live(proc.pid), "a worker process outlived the command"
    assert not out.exists() and stage.is_dir()  # nothing half-finished at --out; the stage is kept for resuming

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "resuming the interrupted prepare" in again.stderr, again.stderr
    check = subprocess.run([*CLI, "data", "inspect", str(out), "--verify"], capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "verified" in check.stdout, check.stderr
    assert sum(load_manifest(out).num_samples("train", t) for t in range(2)) == 4 * 48
