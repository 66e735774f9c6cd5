"""Training on CUDA: bf16 DeepSpeed engines over NCCL, killed and resumed, then continued with a new task."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ENV, kill_at_engine_checkpoint, metrics, sdlora, sets

pytestmark = pytest.mark.gpu

BF16 = ("train.precision=bf16", "train.tasks=2", "train.checkpoint_every=2", "train.max_steps_per_epoch=12")


def _mirrored_digits(root: Path) -> Path:
    """Two new classes (mirrored 0 and 1) as an ImageFolder tree for ``sdlora data add-task``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (0, 1):
        for split, part in (("train", slice(0, 40)), ("test", slice(40, 55))):
            folder = root / split / f"mirror-{label}"
            folder.mkdir(parents=True)
            for i, img in enumerate(digits.images[digits.target == label][part]):
                Image.fromarray((img[:, ::-1] * 16).clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    return root


def test_bf16_kill_resume_continue_on_cuda(cuda_cli, gpu_digits_shards, tmp_path):
    from safetensors import safe_open

    shards = tmp_path / "shards"
    shutil.copytree(gpu_digits_shards, shards)
    base = ["train", "-b", "digits", "--data", str(shards)]
    ref = sdlora(*base, "--run-dir", str(tmp_path / "ref"), *sets(*BF16))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    kill_at_engine_checkpoint([*base, "--run-dir", str(run), *sets(*BF16)], run, task=1)
    assert (run / "tasks" / "task_00").is_dir() and not (run / "tasks" / "task_01").exists()
    resumed = sdlora("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = metrics(run), metrics(tmp_path / "ref")
    assert [(t["train"]["device"], t["train"]["precision"]) for t in got["tasks"]] == [("cuda", "bf16")] * 2
    assert got["accuracy"]["totals"] == want["accuracy"]["totals"]
    # On CPU the resumed bf16 run is bit-identical (test_bf16_cpu.py); CUDA kernels that accumulate with atomics
    # are not reproducible run to run, so a few test images may flip
    assert abs(got["accuracy"]["acc"] - want["accuracy"]["acc"]) <= 5.0
    with safe_open(str(run / "tasks" / "task_01" / "adapters.safetensors"), framework="pt") as fh:
        # low precision lives inside the engine only: checkpoints hold float32
        assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.float32"}

    added = sdlora("data", "add-task", "--out", str(shards), "--root", str(_mirrored_digits(tmp_path / "new")))
    assert added.returncode == 0, added.stderr[-3000:]
    cont = sdlora("train", "--continue", str(run))
    assert cont.returncode == 0, cont.stderr[-3000:]
    after = metrics(run)
    assert len(after["accuracy"]["matrix"]) == 6
    assert after["tasks"][:2] == got["tasks"]  # finished tasks are not retrained
    assert {t["train"]["device"] for t in after["tasks"]} == {"cuda"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NCCL_PROBE = """
import json, torch, torch.distributed as td
from sdlora_dist.jobs import distributed as dist
env = dist.init_distributed(60)
t = torch.arange(4.0, device=env.device)
td.all_reduce(t)
obj = [{"rank": env.rank}]
td.broadcast_object_list(obj, src=0)
dist.barrier()
print(json.dumps({"backend": td.get_backend(), "device": str(env.device), "world": env.world_size,
                  "sum": t.tolist(), "obj": obj[0]}))
dist.shutdown()
"""


def test_nccl_process_group_with_one_rank():
    env = {**ENV, "DS_ACCELERATOR": "cuda", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.pop("CUDA_LAUNCH_BLOCKING", None)
    out = subprocess.run([sys.executable, "-c", NCCL_PROBE], capture_output=True, text=True, timeout=180, env=env,
                         cwd=os.getcwd())  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"backend": "nccl", "device": "cuda:0", "world": 1, "sum": [0.0, 1.0, 2.0, 3.0], "obj": {"rank": 0}}
