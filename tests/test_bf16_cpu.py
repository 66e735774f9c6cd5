"""``train.precision=bf16`` on CPU: DeepSpeed's bf16 engine (the GPU path, on the CPU accelerator) against fp32.

The engine casts the model's parameters to bf16 and keeps float32 masters; low precision lives only inside the
engine (``distributed.release_engine``), so evaluation, consolidation and checkpoints are float32. A backbone
pre-trained on glyphs (``toy_backbone``, 150 steps) makes the runs learn enough for the comparison to mean
something: with a random backbone both runs sit at chance and would agree trivially.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import kill_at_engine_checkpoint, metrics, sdlora, sets
from torch import nn

import sdlora_dist.jobs.distributed as D  # noqa: N812
from sdlora_dist.config import TrainConfig

# A test image is 1/71 of a task's test set (1.4 points): bf16 may flip a couple of images per task.
TOLERANCE_POINTS = 3.0


@pytest.fixture(scope="module")
def shards_and_backbone(tmp_path_factory) -> tuple[Path, Path]:
    """Digits shards and a tiny ViT (TINY's shape) pre-trained on glyphs, both built locally."""
    from sdlora_dist.config import ModelConfig
    from sdlora_dist.data import prepare
    from sdlora_dist.toy_backbone import pretrain_toy_backbone

    root = tmp_path_factory.mktemp("bf16")
    prepare("digits", None, root / "digits", progress=False)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model_cfg = ModelConfig(name="vit_tiny_patch16_224", weights="random", kwargs=kwargs)
    backbone = pretrain_toy_backbone(model_cfg, root / "toy.safetensors", steps=150, batch_size=64)
    return root / "digits", backbone


def _train(shards: Path, backbone: Path, run_dir: Path, precision: str) -> dict:
    settings = (f"model.weights={backbone}", "train.tasks=2", "train.lr=0.02", "train.epochs=10",
                "train.max_steps_per_epoch=30", f"train.precision={precision}")  # fmt: skip
    out = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), *sets(*settings))
    assert out.returncode == 0, out.stderr[-3000:]
    return metrics(run_dir)


@pytest.fixture
def one_process(monkeypatch):
    """No launcher variables: build_engine makes a one-rank group, torn down afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    yield
    D.shutdown()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)


def test_release_engine_gives_back_float32_masters_and_untouched_frozen_weights(one_process):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    assert not torch.equal(frozen_before, frozen_before.bfloat16().float())  # it has bits bf16 would drop
    trained = list(model[2].parameters())
    trained_before = trained[0].detach().clone()
    cfg = D.deepspeed_config(TrainConfig(), micro_batch_per_rank=8, world_size=1, precision="bf16")
    engine = D.build_engine(model, trained, torch.optim.SGD(trained, lr=0.1), None, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # DeepSpeed casts every parameter
    x, y = torch.randn(8, 8).bfloat16(), torch.randint(0, 4, (8,))
    for _ in range(3):
        engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()
    D.release_engine(engine)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model[0].weight, frozen_before)  # frozen weights never took the bf16 rounding
    weight = model[2].weight.detach()
    assert not torch.equal(weight, trained_before)
    assert not torch.equal(weight, weight.bfloat16().float())  # float32 masters, not the bf16 copies


@pytest.mark.slow
def test_bf16_matches_fp32_and_its_checkpoint_resumes_in_fp32(shards_and_backbone, tmp_path):
    from safetensors import safe_open

    shards, backbone = shards_and_backbone
    fp32 = _train(shards, backbone, tmp_path / "fp32", "fp32")
    bf16 = _train(shards, backbone, tmp_path / "bf16", "bf16")
    assert [t["train"]["precision"] for t in bf16["tasks"]] == ["bf16", "bf16"]
    # the runs really computed differently (bf16 arithmetic), yet learned the same
    assert [t["train"]["final_loss"] for t in bf16["tasks"]] != [t["train"]["final_loss"] for t in fp32["tasks"]]
    assert fp32["accuracy"]["matrix"][0][0] >= 60.0  # well above chance (50 %): the comparison can fail
    for row_bf16, row_fp32 in zip(bf16["accuracy"]["matrix"], fp32["accuracy"]["matrix"], strict=True):
        for a, b in zip(row_bf16, row_fp32, strict=True):
            assert (a is None and b is None) or abs(a - b) <= TOLERANCE_POINTS, (bf16["accuracy"], fp32["accuracy"])
    for task in (0, 1):
        with safe_open(str(tmp_path / "bf16" / "tasks" / f"task_{task:02d}" / "adapters.safetensors"), "pt") as fh:
            assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.float32"}

    # The run moves to a machine where precision 'auto' means fp32 (a CPU) and goes on for one more task: this is
    # what a GPU run (auto = bf16) resumed on a CPU does. Only the config differs; the checkpoints are the bf16 run's.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "bf16", moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["train"] |= {"precision": "auto", "tasks": 3}
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = sdlora("train", "--resume", str(moved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = metrics(moved)
    assert [t["train"]["precision"] for t in after["tasks"]] == ["bf16", "bf16", "fp32"]
    assert after["tasks"][:2] == bf16["tasks"]
    assert [row[:2] for row in after["accuracy"]["matrix"][:2]] == bf16["accuracy"]["matrix"]  # rows pad to 3 tasks
    assert len(after["accuracy"]["matrix"][2]) == 3


@pytest.mark.slow
def test_bf16_kill_then_resume_replays_the_uninterrupted_run(shards_and_backbone, tmp_path):
    # The mid-task engine load brings back the trained pair and its float32 masters; the frozen pairs' float32
    # normalisers survive it, so the resumed run is the same computation, bit for bit, on CPU.
    from safetensors.torch import load_file

    shards, backbone = shards_and_backbone
    extra = sets(f"model.weights={backbone}", "train.tasks=2", "train.checkpoint_every=2", "train.epochs=2",
                 "train.max_steps_per_epoch=12", "train.precision=bf16")  # fmt: skip
    base = ["train", "-b", "digits", "--data", str(shards)]
    ref = sdlora(*base, "--run-dir", str(tmp_path / "ref"), *extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    kill_at_engine_checkpoint([*base, "--run-dir", str(run), *extra], run, task=1)
    assert (run / "tasks" / "task_00").is_dir() and not (run / "tasks" / "task_01").exists()
    resumed = sdlora("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from engine checkpoint" in resumed.stderr
    got, want = metrics(run), metrics(tmp_path / "ref")
    assert got["accuracy"]["correct"] == want["accuracy"]["correct"]
    assert [t["train"]["final_loss"] for t in got["tasks"]] == [t["train"]["final_loss"] for t in want["tasks"]]
    a, b = (load_file(str(d / "tasks" / "task_01" / "adapters.safetensors")) for d in (tmp_path / "ref", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
