"""The training recipe end to end on digits shards: real DeepSpeed engines, real processes, real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import TINY, kill_at_engine_checkpoint, metrics, sdlora, sets

from sdlora_dist.metrics import AccuracyLog, summary


def test_metrics_from_hand_made_matrix():
    log = AccuracyLog()
    log.add_row([90], [100])
    log.add_row([80, 45], [100, 50])
    log.add_row([60, 40, 140], [100, 50, 200])
    m = log.matrix()
    assert m == [[90.0, None, None], [80.0, 90.0, None], [60.0, 80.0, 70.0]]
    s = summary(log)
    curve = [90.0, 125 / 150 * 100, 240 / 350 * 100]
    assert s["top1_curve"] == pytest.approx(curve)
    assert s["acc"] == pytest.approx(240 / 350 * 100)
    assert s["aaa"] == pytest.approx(sum(curve) / 3)
    assert s["mean_task_acc"] == pytest.approx(70.0)
    # forgetting: task 0 best 90 -> 60 (30), task 1 best 90 -> 80 (10)
    assert s["forgetting"] == pytest.approx(20.0)
    assert s["bwt"] == pytest.approx(((60 - 90) + (80 - 90)) / 2)


def test_forgetting_uses_numeric_task_order():
    # 12 groups: a lexicographic sort would put group 10 and 11 before group 2.
    log = AccuracyLog()
    totals = [10] * 12
    for t in range(12):
        log.add_row([10 - (j == 2 and t > 2) * 5 for j in range(t + 1)], totals[: t + 1])
    s = summary(log)
    assert s["forgetting"] == pytest.approx(50.0 / 11)  # only group 2 dropped, by 50 points


@pytest.mark.slow
def test_two_ranks_match_one_rank(digits_shards, tmp_path):
    import torch
    from safetensors.torch import load_file

    one = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(tmp_path / "one"),
                 *sets("train.tasks=3"))  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(tmp_path / "two"),
                 "--gpus-per-node", "2", *sets("train.tasks=3"))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m2["accuracy"]["matrix"]) == 3
    assert [t["world_size"] for t in m2["tasks"]] == [2, 2, 2]
    # every test sample counted exactly once across ranks
    assert m2["accuracy"]["totals"] == m1["accuracy"]["totals"]
    # The pipeline gives each step the same global batch on 1 and 2 ranks, so both train the same model. Only the
    # float summation order differs (one 16-sample mean vs the all-reduced mean of two 8-sample means): the adapters
    # agree to ~3e-8 after 3 tasks (measured), far below any logit margin here, so every prediction is the same.
    for task in range(3):
        one_w, two_w = (load_file(tmp_path / r / "tasks" / f"task_{task:02d}" / "adapters.safetensors") for r in
                        ("one", "two"))  # fmt: skip
        assert one_w.keys() == two_w.keys()
        for key in one_w:
            torch.testing.assert_close(two_w[key], one_w[key], rtol=0, atol=1e-6, msg=f"task {task} {key}")
    flat1, flat2 = ([a for row in m["accuracy"]["matrix"] for a in row if a is not None] for m in (m1, m2))
    assert flat2 == pytest.approx(flat1, abs=1e-9), (m1["accuracy"]["matrix"], m2["accuracy"]["matrix"])
    assert m2["accuracy"]["correct"] == m1["accuracy"]["correct"]


@pytest.mark.slow
def test_kill_then_resume_replays_uninterrupted_run(digits_shards, tmp_path):
    extra = sets("train.tasks=3", "train.checkpoint_every=2", "train.max_steps_per_epoch=12", "train.epochs=2")
    base = ["train", "-b", "digits", "--data", str(digits_shards)]
    ref = sdlora(*base, "--run-dir", str(tmp_path / "ref"), *extra)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "killed"
    kill_at_engine_checkpoint([*base, "--run-dir", str(run_dir), *extra], run_dir, task=1)
    assert (run_dir / "tasks" / "task_00").is_dir() and not (run_dir / "tasks" / "task_02").exists()
    task0_mtime = (run_dir / "tasks" / "task_00" / "adapters.safetensors").stat().st_mtime

    resumed = sdlora("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from engine checkpoint" in resumed.stderr
    assert (run_dir / "tasks" / "task_00" / "adapters.safetensors").stat().st_mtime == task0_mtime  # not retrained
    assert metrics(run_dir)["accuracy"]["correct"] == metrics(tmp_path / "ref")["accuracy"]["correct"]
    assert not list(run_dir.rglob("*.tmp")) and not list((run_dir / "tasks").glob(".*"))


@pytest.mark.slow
def test_add_task_then_continue(digits_shards, tmp_path):
    import shutil

    from PIL import Image
    from sklearn.datasets import load_digits

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    base = ["train", "-b", "digits", "--data", str(shards), "--run-dir", str(tmp_path / "run")]
    first = sdlora(*base, *sets("train.tasks=5"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = metrics(tmp_path / "run")
    # new classes arrive: mirrored digits 0 and 1 as two new classes
    digits = load_digits()
    root = tmp_path / "new"
    for label in (0, 1):
        for split, sl in (("train", slice(0, 40)), ("test", slice(40, 55))):
            folder = root / split / f"mirror-{label}"
            folder.mkdir(parents=True)
            for i, img in enumerate(digits.images[digits.target == label][sl]):
                Image.fromarray((img[:, ::-1] * 16).clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    split_before = json.loads((tmp_path / "run" / "run.json").read_text())["task_split"]
    added = sdlora("data", "add-task", "--out", str(shards), "--root", str(root))
    assert added.returncode == 0, added.stderr[-3000:]
    cont = sdlora("train", "--continue", str(tmp_path / "run"))
    assert cont.returncode == 0, cont.stderr[-3000:]
    after = metrics(tmp_path / "run")
    assert len(after["accuracy"]["matrix"]) == 6 and len(after["accuracy"]["matrix"][-1]) == 6
    assert after["accuracy"]["correct"][:5] == before["accuracy"]["correct"]
    assert [t["task"] for t in after["tasks"]] == [0, 1, 2, 3, 4, 5]
    assert after["tasks"][:5] == before["tasks"]  # earlier tasks were not retrained
    split = json.loads((tmp_path / "run" / "run.json").read_text())["task_split"]  # the new classes: a new task
    assert split["task_classes"][:5] == split_before["task_classes"]
    assert sorted(split["task_classes"][5]) == ["mirror-0", "mirror-1"]
    again = sdlora("train", "--continue", str(tmp_path / "run"))
    assert again.returncode == 2 and "add-task" in again.stderr


def test_bad_inputs(digits_shards, tmp_path):
    from sdlora_dist.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(list(args))
        return code, err.getvalue()

    code, err = run("train", "-b", "nope", "--data", str(digits_shards))
    assert code == 2 and "unknown benchmark 'nope'" in err and "digits" in err
    code, err = run("train", "-b", "cifar100", "--data", str(digits_shards), "--set", "model.weights=random")
    assert code == 2 and "hold benchmark 'digits'" in err
    code, err = run("train", "-b", "digits", "--data", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    code, err = run("train", "-b", "digits", "--data", str(digits_shards), "--nodes", "2")
    assert code == 2 and "--hostfile" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(blocker / "run"))
    assert code == 2 and "not writable" in err
    code, err = run("train", "-b", "digits", "--data", str(digits_shards), "--gpus-per-node", "3")
    assert code == 2 and "data.batch_size=32 is the global batch" in err
    code, err = run("train", "-b", "digits", "--data", str(digits_shards), "--set", "train.lr=-1")
    assert code == 2 and "train.lr: must be a positive number (got -1" in err
    # a run dir holding another run's config: --resume with a changed value is refused
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from sdlora_dist.fileio import atomic_write_text
    from sdlora_dist.jobs.frontdoor import resolve_config

    cfg = resolve_config("digits", None, TINY, str(digits_shards), str(run_dir))
    import yaml

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict()))
    code, err = run("train", "--resume", str(run_dir), "--set", "train.lr=0.5")
    assert code == 2 and "different config" in err and "train.lr" in err
    code, err = run("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir))
    assert code == 2 and "already holds a run" in err


@pytest.mark.slow
def test_two_nodes_on_localhost_share_rank0_consolidation(digits_shards, tmp_path):
    """Two "nodes" (node ranks 0 and 1, one process each) through the CLI's multi-node path (DeepSpeed runner)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "sdlora_dist.cli.main", "train", "-b", "digits", "--data", str(digits_shards),
               "--run-dir", str(tmp_path / f"run{node}"), "--nodes", "2", "--gpus-per-node", "1", "--hostfile",
               str(hosts), "--no-ssh", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
               str(port), *sets("train.tasks=3", "adapter.kd=true")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:]
    applied = [
        sorted(line.split("] ", 1)[1] for line in out.splitlines() if "applied rank 0's" in line) for out in outputs
    ]
    assert len(applied[0]) == 2 and applied[0] == applied[1]  # same decision and same adapter state on both nodes
    m = metrics(tmp_path / "run0")  # rank 0 (node 0) owns the run directory
    decisions = [t["consolidation_of_previous"] for t in m["tasks"][1:]]
    assert [d["task"] for d in decisions] == ["task_00", "task_01"] and decisions[1]["relative_residual"] > 0
    assert [t["world_size"] for t in m["tasks"]] == [2, 2, 2]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra [tensorboard]; installed by [dev]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdlora_dist.recipe import write_tensorboard
    from sdlora_dist.records import RunProgress, TaskRecord, TrainStats

    progress = RunProgress()
    for t, (correct, totals) in enumerate([([9], [10]), ([7, 8], [10, 10])]):
        progress.log.add_row(correct, totals)
        train = TrainStats(steps=1, final_loss=0.5 - 0.1 * t, images=8, corrupt_skipped=0)
        progress.tasks.append(
            TaskRecord(task=t, classes=1, rank=4, consolidation_of_previous=None, magnitudes={"task_00": [0.8, 1.0]},
                       train=train, world_size=1, time_s={"train": 1.0})
        )  # fmt: skip
        write_tensorboard(tmp_path, progress)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("accuracy/top1_seen")] == pytest.approx([90.0, 75.0])
    assert [e.value for e in events.Scalars("accuracy/task_00")] == pytest.approx([90.0, 70.0])
    assert [e.step for e in events.Scalars("magnitude/task_00")] == [0, 1]
