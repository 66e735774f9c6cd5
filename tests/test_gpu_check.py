"""Without a GPU: the GPU tests are collected and skipped cleanly, and ``bench/gpu_check.sh`` says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def _pytest(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=NO_GPU, cwd=REPO)


@pytest.mark.slow  # launches pytest in a subprocess
def test_gpu_tests_are_collected_and_skipped_without_cuda():
    listed = _pytest("--collect-only", "-q")
    assert listed.returncode == 0, listed.stdout[-2000:]
    ids = [line for line in listed.stdout.splitlines() if line.startswith("tests/gpu/")]
    names = {i.split("::")[-1] for i in ids}
    expected = {"test_bf16_kill_resume_continue_on_cuda", "test_nccl_process_group_with_one_rank",
                "test_fp16_export_matches_pytorch_on_the_cuda_provider", "test_tensorrt_provider_when_it_loads",
                "test_predict_cli_with_cuda_provider"}  # fmt: skip
    assert expected <= names
    ran = _pytest("-q", "-rs")
    assert ran.returncode == 0, ran.stdout[-2000:]
    assert f"{len(ids)} skipped" in ran.stdout and "passed" not in ran.stdout and "failed" not in ran.stdout
    assert ran.stdout.count("no CUDA device visible") >= 1


def _gpu_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = ["bash", "bench/gpu_check.sh"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def test_gpu_check_without_a_gpu_prints_one_line_and_runs_nothing(tmp_path):
    results = REPO / "bench" / "results"
    before = sorted(p.name for p in results.iterdir())
    # a machine whose driver tool lists no GPU (or has none), and one where CUDA_VISIBLE_DEVICES hides them
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    for env in (NO_GPU, {**os.environ, "PATH": f"{fake}:/usr/bin:/bin"}):
        out = _gpu_check(env)
        assert out.returncode == 0 and out.stderr == ""
        assert out.stdout.splitlines() == [out.stdout.strip()] and "no GPU visible" in out.stdout
    assert sorted(p.name for p in results.iterdir()) == before
    assert not (REPO / ".venv-gpu").exists()
