"""Training basics: a non-finite loss stops the run cleanly, gradient accumulation and clipping, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import error_line, metrics, sdlora, sets
from safetensors.torch import load_file

from sdlora_dist.tracking import read_steps_csv


def _train(shards: Path, run_dir: Path, *extra: str):
    return sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir),
                  *sets("train.tasks=2", *extra))  # fmt: skip


def test_deepspeed_config_carries_accumulation_and_clipping():
    from sdlora_dist.config import TrainConfig
    from sdlora_dist.jobs.distributed import deepspeed_config

    cfg = deepspeed_config(TrainConfig(), micro_batch_per_rank=4, world_size=2, precision="fp32", grad_accum=3,
                           grad_clip=1.5)  # fmt: skip
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 3)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 1.5


def test_deterministic_switches_torch_to_deterministic_algorithms():
    from sdlora_dist.recipe import set_deterministic

    before = torch.are_deterministic_algorithms_enabled()
    try:
        set_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(digits_shards, tmp_path):
    # task 0 trains normally; task 1's learning rate blows the weights up after its first step, so the loss of
    # its step 2 is NaN: a real divergence, no injection hook
    run_dir = tmp_path / "run"
    done = _train(digits_shards, run_dir, "train.first_task_lr=0.01", "train.lr=1e30", "train.checkpoint_every=0")
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert "task 1: the training loss is not finite on 1 rank(s) (rank 0: nan) at step 2 of 6" in line
    assert f"Last good checkpoint: {run_dir / 'tasks' / 'task_00'}." in line
    assert "Traceback" not in done.stderr
    # the checkpoint of task 0 is intact: it loads, its adapters are finite, and task 1 left no folder
    assert sorted(p.name for p in (run_dir / "tasks").iterdir()) == ["task_00"]
    adapters = load_file(run_dir / "tasks" / "task_00" / "adapters.safetensors")
    assert adapters and all(torch.isfinite(t).all() for t in adapters.values())
    assert metrics(run_dir)["accuracy"]["matrix"][0][0] > 0
    # nothing of the NaN step was logged as a training step
    losses = read_steps_csv(run_dir, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 8)) and all(v == v for _, v in losses)


@pytest.mark.slow
def test_grad_accum_two_half_micro_batches_equal_one_batch(digits_shards, tmp_path):
    one = _train(digits_shards, tmp_path / "one", "train.grad_accum=1")
    two = _train(digits_shards, tmp_path / "two", "train.grad_accum=2", "train.deterministic=true")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # same optimizer steps and images per task: the global batch stays data.batch_size
    assert [(t["train"]["steps"], t["train"]["images"]) for t in m1["tasks"]] == [(6, 96), (6, 96)]
    assert [(t["train"]["steps"], t["train"]["images"]) for t in m2["tasks"]] == [(6, 96), (6, 96)]
    assert [t["train"]["final_loss"] for t in m1["tasks"]] == pytest.approx(
        [t["train"]["final_loss"] for t in m2["tasks"]], rel=1e-5
    )
    assert m1["accuracy"]["correct"] == m2["accuracy"]["correct"]
    flat1, flat2 = ([v for row in m["accuracy"]["matrix"] for v in row if v is not None] for m in (m1, m2))
    assert flat1 == pytest.approx(flat2)
    # the per-step loss curve and the trained tensors agree to float tolerance
    l1, l2 = read_steps_csv(tmp_path / "one", "train/loss"), read_steps_csv(tmp_path / "two", "train/loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 13))
    assert [v for _, v in l1] == pytest.approx([v for _, v in l2], rel=1e-5, abs=1e-6)
    for task in ("task_00", "task_01"):
        a = load_file(tmp_path / "one" / "tasks" / task / "adapters.safetensors")
        b = load_file(tmp_path / "two" / "tasks" / task / "adapters.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # per-class counts and the confusion matrix agree with the per-task counts they refine
    per_class, confusion = m1["per_class"], m1["confusion"]
    per_task = json.loads((tmp_path / "one" / "run.json").read_text())["task_split"]["classes_per_task"][:2]
    assert confusion["after_task"] == 1 and len(confusion["matrix"]) == sum(per_task)
    assert [sum(row) for row in confusion["matrix"]] == per_class["totals"]
    bounds = [0, per_task[0], sum(per_task)]
    for t, row in enumerate(per_class["correct"]):
        assert len(row) == bounds[t + 1]
        assert [sum(row[bounds[j] : bounds[j + 1]]) for j in range(t + 1)] == m1["accuracy"]["correct"][t]


@pytest.mark.slow
def test_two_ranks_with_grad_accum_match_one_rank_without(digits_shards, tmp_path):
    # samples per optimizer step stay data.batch_size whatever the ranks and the accumulation: 2 ranks x 2
    # micro-batches of 4 take the same steps as 1 rank x 1 batch of 16
    one = _train(digits_shards, tmp_path / "one")
    two = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(tmp_path / "two"),
                 "--gpus-per-node", "2", *sets("train.tasks=2", "train.grad_accum=2"))  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [t["world_size"] for t in m2["tasks"]] == [2, 2]
    assert [(t["train"]["steps"], t["train"]["images"]) for t in m2["tasks"]] == [(6, 96), (6, 96)]
    for task in ("task_00", "task_01"):
        a = load_file(tmp_path / "one" / "tasks" / task / "adapters.safetensors")
        b = load_file(tmp_path / "two" / "tasks" / task / "adapters.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert m2["accuracy"]["correct"] == m1["accuracy"]["correct"]
