"""Continual deployment (issue 19): ``export --task K`` from the per-task checkpoints, lineage in the file,
``evaluate`` on a run's own class order, the gate, and versioned publishing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import error_line, run_main
from lifecycle_helpers import shard_crops, start_run, train_tasks

from sdlora_dist.checkpoint import file_sha256, load_run
from sdlora_dist.export.from_run import export_run
from sdlora_dist.export.inference import OnnxClassifier
from sdlora_dist.export.lineage import read_lineage

KD_RR = ("adapter.kd=true", "adapter.rank_schedule=[[0,4],[2,2]]")


def logits(path: Path, crops: np.ndarray) -> np.ndarray:
    return OnnxClassifier(path, provider="cpu").logits(crops)


@pytest.mark.slow  # five tasks and four exports of a tiny ViT: about a minute on 2 cores
def test_export_task_after_later_tasks_equals_the_export_made_then(digits_shards, tmp_path, capsys):
    """Task 2 is exported right after it finished; tasks 3 and 4 follow (task 3 opens by KD-absorbing task 2's
    pair, RR lowers the rank from task 2); ``export --task 2`` then gives the same logits on the test shards."""
    run_dir = tmp_path / "run"
    model, per_task = start_run(run_dir, digits_shards, *KD_RR)
    at_the_time = tmp_path / "task2_then.onnx"

    def export_task_2(t: int) -> None:
        if t == 2:
            export_run(at_the_time, run_dir=run_dir, verify_images=8)

    train_tasks(model, run_dir, per_task, range(5), in_span=(2,), after=export_task_2)
    assert [d["action"] for d in model.decisions] == ["frozen", "frozen", "absorbed", "frozen"]
    assert load_run(run_dir, 2).model.layout() != load_run(run_dir).model.layout()

    later = tmp_path / "task2_later.onnx"
    rc, out, _ = run_main(capsys, "export", str(later), "--run", str(run_dir), "--task", "2", "--verify-images", "8")
    assert rc == 0, out
    crops = shard_crops(digits_shards)
    then, now = logits(at_the_time, crops), logits(later, crops)
    assert then.shape == (len(crops), 6)
    assert np.abs(then - now).max() <= 1e-6
    newest = tmp_path / "task4.onnx"
    assert run_main(capsys, "export", str(newest), "--run", str(run_dir), "--verify-images", "0")[0] == 0
    assert logits(newest, crops).shape == (len(crops), 10)

    lineage = read_lineage(OnnxClassifier(later, provider="cpu").metadata, str(later))
    assert (lineage.task, lineage.num_tasks, lineage.run_tasks_done) == (2, 3, 5)
    recorded = json.loads((run_dir / "run.json").read_text())["task_split"]["task_classes"]
    assert lineage.task_classes == recorded[:3] and lineage.data_fingerprint
    newest_lineage = read_lineage(OnnxClassifier(newest, provider="cpu").metadata, str(newest))
    assert newest_lineage.parent_sha256 == file_sha256(later)  # task 2's newest export is task 4's parent


@pytest.mark.parametrize("task", ["5", "-1"])
def test_export_task_out_of_range_is_one_line(digits_shards, tmp_path, capsys, task):
    run_dir = tmp_path / "run"
    model, per_task = start_run(run_dir, digits_shards)
    train_tasks(model, run_dir, per_task, range(2))
    rc, _, err = run_main(capsys, "export", str(tmp_path / "m.onnx"), "--run", str(run_dir), "--task", task)
    assert rc == 2
    assert error_line(err) == (
        f"error: --task {task} is not a completed task of {run_dir}: its completed tasks are 0..1 (omit --task for "
        "the newest, 1)"
    )
    assert not (tmp_path / "m.onnx").exists() and not (run_dir / "exports.json").exists()
