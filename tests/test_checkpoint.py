"""Task checkpoints: per-task storage flat in the task count, exact resume from any task folder, old runs load,
checksums, and derived state rebuilt by ``load_state_dict`` alone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import INPUTS, LABELS_PER_TASK, set_current_in_span, train_task

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.errors import UserError
from sdlora_dist.model import SDLoRAViT, build_model
from sdlora_dist.records import TaskRecord, TrainStats


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def logits(model: SDLoRAViT) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS)


def next_task(model: SDLoRAViT, task: int, *, in_span: bool = False) -> None:
    """One recipe task at model level: close the open task, open ``task`` (seeded as the recipe does), train."""
    if model.current_key is not None:
        model.consolidate()
    torch.manual_seed(1000 + task)
    model.add_task(LABELS_PER_TASK)
    train_task(model, task)
    if in_span:  # KD will absorb this pair when the next task opens
        set_current_in_span(model, {k: 0.5 - 0.2 * i for i, k in enumerate(model.frozen_keys)})


@pytest.mark.slow  # many tasks of a tiny ViT: over 2 s
def test_load_state_dict_alone_rebuilds_past_bank_and_norms(tiny_cfg):
    cfg = tiny_cfg("adapter.rank_schedule=[[0,4],[2,2]]")
    source = build_model(cfg)
    for t in range(3):
        next_task(source, t)
    target = build_model(cfg)
    target.restore_layout(source.layout())  # random pairs: the bank now derives from the wrong factors
    before = logits(target)
    target.load_state_dict(source.state_dict())  # plain nn.Module call, no rebuild_derived_state()
    assert not torch.equal(before, logits(target))
    assert torch.equal(logits(target), logits(source))
    for got, want in zip(target.adapters, source.adapters, strict=True):
        assert torch.equal(got.past_A, want.past_A) and torch.equal(got.past_inv_norm, want.past_inv_norm)


@pytest.mark.slow  # many tasks of a tiny ViT: over 2 s
def test_fifty_task_checkpoints_grow_linearly(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    ckpt.write_run_header(tmp_path, cfg, model, {"benchmark": "test"})
    gen = torch.Generator().manual_seed(0)
    for t in range(50):
        if t:
            model.consolidate()
        model.add_task(2)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ckpt.save_task_checkpoint(tmp_path, t, model, {"task": t})
    tasks = tmp_path / "tasks"
    sizes = [folder_bytes(tasks / f"task_{t:02d}") for t in range(50)]
    assert sizes[-1] <= 2 * sizes[0], sizes
    # the last folder stores one pair, not fifty: its factor bytes equal task 0's
    own = json.loads((tasks / "task_49" / "layout.json").read_text())["checkpoint"]["sources"]
    assert own == {**{f"task_{t:02d}": f"task_{t:02d}" for t in range(50)},
                   **{f"head.task_{t:02d}": f"task_{t:02d}" for t in range(50)}}  # fmt: skip
    loaded = ckpt.load_task_model(tmp_path, 49)
    assert torch.equal(logits(loaded), logits(model))


def run_recipe(model: SDLoRAViT, run_dir: Path, tasks: range) -> None:
    for t in tasks:
        next_task(model, t, in_span=t == 2)
        ckpt.save_task_checkpoint(run_dir, t, model, {"task": t})


@pytest.mark.slow  # many tasks of a tiny ViT: over 2 s
def test_resume_from_any_task_folder_reproduces_the_run(tiny_cfg, tmp_path):
    """KD absorbs task 2's pair, RR lowers the rank from task 2: both must survive any split of the run."""
    cfg = tiny_cfg("adapter.rank_schedule=[[0,4],[2,2]]", "adapter.kd=true")
    ref_dir = tmp_path / "ref"
    model = build_model(cfg)
    ckpt.write_run_header(ref_dir, cfg, model, {"benchmark": "test"})
    run_recipe(model, ref_dir, range(5))
    assert [d["action"] for d in model.decisions] == ["frozen", "frozen", "absorbed", "frozen"]
    want = model.state_dict()
    for k in range(4):
        run_dir = tmp_path / f"from_{k}"
        shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns(*[f"task_{t:02d}" for t in range(k + 1, 5)]))
        resumed = ckpt.load_task_model(run_dir, k)
        run_recipe(resumed, run_dir, range(k + 1, 5))
        got = ckpt.load_task_model(run_dir, 4).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want), f"resume from task {k}"
        assert resumed.layout() == model.layout()


def task_record(t: int, time_s: dict[str, float] | None = None) -> TaskRecord:
    """A task record as recipe.run_task writes it (values made up; only their round trip matters here)."""
    return TaskRecord(task=t, classes=2, rank=4, consolidation_of_previous=None, magnitudes={"task_00": [1.0]},
                      train=TrainStats(steps=3, final_loss=0.5, images=12, corrupt_skipped=0), world_size=1,
                      time_s=time_s if time_s is not None else {"train": 1.0})  # fmt: skip


def test_progress_holds_own_record_and_metrics_the_history(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    ckpt.write_run_header(tmp_path, cfg, model, {"benchmark": "test"})
    history = []
    for t in range(3):
        next_task(model, t)
        times = {"train": 1.0}
        record = task_record(t, times)  # to_dict shares times: the checkpoint phase lands in both files
        history.append(record.to_dict())
        row = {"record": record.to_dict(), "correct": [t] * (t + 1), "totals": [5] * (t + 1)}
        ckpt.save_task_checkpoint(tmp_path, t, model, row, times=times, metrics={"tasks": history}, metrics_csv="x\n")
    own = json.loads((tmp_path / "tasks" / "task_02" / "progress.json").read_text())
    assert own["record"]["task"] == 2 and "tasks" not in own
    assert own["record"]["time_s"]["checkpoint"] > 0  # measured inside, written once
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["task"] for r in metrics["tasks"]] == [0, 1, 2]
    assert metrics["tasks"][2]["time_s"] == own["record"]["time_s"]
    assert ckpt.load_progress(tmp_path, 2).log.correct == [[0], [1, 1], [2, 2, 2]]
    # a record that lost a key is one readable error naming the file, not a KeyError deep in a resume
    path = tmp_path / "tasks" / "task_01" / "progress.json"
    damaged = json.loads(path.read_text())
    del damaged["record"]["magnitudes"]
    path.write_text(json.dumps(damaged))
    with pytest.raises(UserError, match=re.escape(f"{path}: the record of task 1 lacks ['magnitudes']")):
        ckpt.load_progress(tmp_path, 2)


@pytest.mark.parametrize("damage", ["bytes", "missing"])
def test_damaged_earlier_folder_is_named(tiny_cfg, tmp_path, damage):
    cfg = tiny_cfg()
    model = build_model(cfg)
    ckpt.write_run_header(tmp_path, cfg, model, {"benchmark": "test"})
    run_recipe(model, tmp_path, range(2))
    first = tmp_path / "tasks" / "task_00"
    if damage == "bytes":
        data = bytearray((first / "adapters.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (first / "adapters.safetensors").write_bytes(bytes(data))
        message = "task_00/adapters.safetensors: sha256"
    else:
        shutil.rmtree(first)
        message = "needs the tensors of ['head.task_00', 'task_00'] from"
    with pytest.raises(UserError, match=re.escape(message)):
        ckpt.load_task_model(tmp_path, 1)


@pytest.mark.slow  # many tasks of a tiny ViT: over 2 s
def test_lora_seq_rewrites_its_one_open_pair_every_task(tiny_cfg, tmp_path):
    """lora-seq trains the same pair in every task: each folder must hold it, and every task loads exactly."""
    cfg = tiny_cfg("train.method=lora-seq")
    model = build_model(cfg)
    ckpt.write_run_header(tmp_path, cfg, model, {"benchmark": "test"})
    want = []
    for t in range(3):
        next_task(model, t)
        ckpt.save_task_checkpoint(tmp_path, t, model, {"task": t})
        want.append(logits(model))
    layout = json.loads((tmp_path / "tasks" / "task_02" / "layout.json").read_text())
    assert layout["checkpoint"]["sources"] == {
        "task_00": "task_02",
        "head.task_00": "task_00",
        "head.task_01": "task_01",
        "head.task_02": "task_02",
    }
    for t in range(3):
        assert torch.equal(logits(ckpt.load_task_model(tmp_path, t)), want[t])
