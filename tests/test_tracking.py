"""train.report_to: per-step scalars and per-task accuracy in csv, TensorBoard, a real MLflow server and W&B
offline files, on a step axis that keeps rising across tasks and across --resume."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import ENV, kill_at_engine_checkpoint, metrics, sdlora, sets

from sdlora_dist.tracking import read_steps_csv, resolve

STEPS = list(range(1, 13))  # 2 tasks x 6 optimizer steps


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` with a sqlite backend on a free 127.0.0.1 port; yields its URI."""
    pytest.importorskip("mlflow", reason="optional extra [mlflow]; installed by [dev]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    log = (tmp_path / "mlflow.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "mlflow.log").read_text()
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_default_trackers_are_csv_and_tensorboard_when_installed():
    pytest.importorskip("tensorboard")
    assert resolve(None) == ["csv", "tensorboard"]
    assert resolve(["csv", "csv", "mlflow"]) == ["csv", "mlflow"]


def _tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_two_tasks_and_resume_log_one_rising_step_axis(digits_shards, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setitem(ENV, "MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setitem(ENV, "MLFLOW_EXPERIMENT_NAME", "p23-test")
    run_dir = tmp_path / "run"
    trackers = "train.report_to=[csv, tensorboard, mlflow]"
    args = ["train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
            *sets("train.tasks=2", "train.checkpoint_every=2", trackers)]  # fmt: skip
    kill_at_engine_checkpoint(args, run_dir, task=1)
    assert not (run_dir / "tasks" / "task_01").exists()  # killed inside task 1
    resumed = sdlora("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "tracking: csv, tensorboard, mlflow" in resumed.stderr

    # csv: every optimizer step exactly once, in order, across the task boundary and the kill
    loss = read_steps_csv(run_dir, "train/loss")
    assert [s for s, _ in loss] == STEPS and all(v > 0 for _, v in loss)
    assert [s for s, _ in read_steps_csv(run_dir, "train/lr")] == STEPS
    acc = read_steps_csv(run_dir, "accuracy/acc")
    final = metrics(run_dir)["accuracy"]
    assert acc == [(6, pytest.approx(final["top1_curve"][0])), (12, pytest.approx(final["acc"]))]
    assert read_steps_csv(run_dir, "accuracy/aaa")[-1][1] == pytest.approx(final["aaa"])
    # per-class counts survive the resume: one row per task, the confusion matrix of the last
    per_class = metrics(run_dir)["per_class"]
    assert len(per_class["correct"]) == 2 and metrics(run_dir)["confusion"]["after_task"] == 1

    # TensorBoard, through its own event reader: the purge on resume leaves each step once
    pytest.importorskip("tensorboard")
    tb = _tb_scalars(run_dir, "train/loss")
    assert [s for s, _ in tb] == STEPS
    assert [v for _, v in tb] == pytest.approx([v for _, v in loss])
    assert [s for s, _ in _tb_scalars(run_dir, "accuracy/acc")] == [6, 12]

    # MLflow, read back from the server: one run, each step once, the same values, artifacts attached
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("p23-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == STEPS
    assert [m.value for m in history] == pytest.approx([v for _, v in loss], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run_id, "accuracy/acc")] == [6, 12]
    assert runs[0].data.params["train.tasks"] == "2"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "run.json", "metrics.json", "report.md"} <= names
    assert any(n.endswith(".png") for n in names)


@pytest.mark.slow
def test_wandb_offline_writes_its_run_files(digits_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional extra [wandb]; installed by [dev]")
    monkeypatch.setitem(ENV, "WANDB_MODE", "offline")
    monkeypatch.setitem(ENV, "WANDB_PROJECT", "p23-test")
    run_dir = tmp_path / "run"
    done = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                  *sets("train.tasks=2", "train.report_to=[wandb]"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = list((run_dir / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("run-*.wandb"))
    assert len(data) == 1 and data[0].stat().st_size > 0
    records = _wandb_history(data[0])
    assert [r["_step"] for r in records if "train/loss" in r] == STEPS
    final = metrics(run_dir)["accuracy"]
    assert [r["accuracy/acc"] for r in records if "accuracy/acc" in r] == pytest.approx(final["top1_curve"])
    files = runs[0] / "files" / "run"  # files/<run dir name>/...: W&B keeps its own config.yaml in files/
    assert {"config.yaml", "run.json", "metrics.json"} <= {p.name for p in files.iterdir()}
    assert (files / "report" / "report.md").is_file() and list((files / "report").glob("*.png"))
    assert not (run_dir / "tracking" / "steps.csv").exists()  # report_to names the trackers exactly
    shutil.rmtree(run_dir / "tracking" / "wandb")  # offline runs are large-ish: keep tmp small


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB's log format (32 KiB blocks of
    [crc32 4, length 2, type 1] chunks: 1 full, 2 first, 3 middle, 4 last). wandb >= 0.2x ships no Python reader."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, records, parts = 7, [], b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        parts += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
        elif kind == 0:  # zero padding at the end
            break
    return records


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline W&B run file, decoded with wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows
