"""Continual deployment (issue 19): ``export --task K`` from the per-task checkpoints, lineage in the file,
``evaluate`` on a run's own class order, the gate, and versioned publishing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import error_line, metrics, run_main, sdlora
from data_fixtures import make_image_folder
from lifecycle_helpers import scramble_head, shard_crops, start_run, train_tasks

from sdlora_dist.checkpoint import load_run
from sdlora_dist.cli.main import main
from sdlora_dist.export.from_run import export_run
from sdlora_dist.export.inference import OnnxClassifier
from sdlora_dist.export.lineage import read_lineage
from sdlora_dist.fileio import file_sha256

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


# ---------------------------------------------------------------------------------------------------------------------
# A trained run with its own class order and split: evaluate, gate, publish


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> dict[str, Path]:
    """``sdlora train`` with data.class_order_seed=1 and data.tasks=4 (not the shards' seed-1993 order and 5-task
    split); task 2's model exported right after task 2 (``train.tasks=3``), then ``--continue`` to task 3."""
    from sdlora_dist.jobs.frontdoor import resolve_config
    from sdlora_dist.toy_backbone import pretrain_toy_backbone

    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    recipe = resolve_config("digits", None, [], str(digits_shards), None)  # the demo's ViT: a random one learns ~0
    backbone = pretrain_toy_backbone(recipe.model, root / "backbone.safetensors", steps=150, per_class=30,
                                     batch_size=64)  # fmt: skip
    settings = [f"model.weights={backbone}", "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=25",
                "data.class_order_seed=1", "data.tasks=4", "train.tasks=3", "train.timeout_s=120"]  # fmt: skip
    args = ["train", "--data", str(digits_shards), "--benchmark", "digits", "--run-dir", str(run_dir),
            *[arg for item in settings for arg in ("--set", item)]]  # fmt: skip
    done = sdlora(*args, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    models = {"task2": root / "task2.onnx", "task3": root / "task3.onnx"}
    assert main(["export", str(models["task2"]), "--run", str(run_dir), "--verify-images", "8"]) == 0
    done = sdlora("train", "--continue", str(run_dir), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["export", str(models["task3"]), "--run", str(run_dir), "--verify-images", "8"]) == 0
    return {"run": run_dir, "root": root, **models}


@pytest.mark.slow
def test_evaluate_reads_the_runs_own_class_order_and_split(trained, digits_shards, capsys):
    """Measured before lineage: exit 2 "the shards ... do not match the model". Now: the run's own numbers."""
    matrix = metrics(trained["run"])["accuracy"]["correct"]
    for name, row in (("task2", matrix[2]), ("task3", matrix[3])):
        rc, out, err = run_main(capsys, "evaluate", str(trained[name]), "--data", str(digits_shards))
        assert rc == 0, err
        per_task = json.loads(out)["per_task"]
        assert [per_task[str(t)]["correct"] for t in range(len(row))] == row
    lineage = read_lineage(OnnxClassifier(trained["task3"], provider="cpu").metadata, "task3")
    assert [len(t) for t in lineage.task_classes] == [3, 3, 2, 2] and lineage.class_order_from == "seed 1"
    assert lineage.test_accuracy["correct"] == matrix[3]
    assert lineage.parent_sha256 == file_sha256(trained["task2"])
    rc, out, _ = run_main(capsys, "inspect", str(trained["task3"]))
    assert rc == 0 and f"parent: {file_sha256(trained['task2'])}" in out and "task 3 of the 4" in out


@pytest.mark.slow
def test_gate_passes_itself_and_matches_evaluate(trained, digits_shards, tmp_path, capsys):
    report = tmp_path / "gate.json"
    new = str(trained["task3"])
    rc, out, err = run_main(capsys, "gate", new, "--baseline", new, "--data", str(digits_shards), "--report",
                            str(report))  # fmt: skip
    assert rc == 0, err
    assert "gate: PASS" in out
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["old_classes"]["drop"] == 0.0
    rc, out, _ = run_main(capsys, "evaluate", new, "--data", str(digits_shards))
    evaluated = json.loads(out)["per_task"]
    assert [(r["correct"], r["total"]) for r in data["tasks"]] == [
        (evaluated[str(t)]["correct"], evaluated[str(t)]["total"]) for t in range(4)
    ]
    assert data["models"]["new"]["evaluation"]["per_task"] == evaluated


@pytest.mark.slow
def test_gate_fails_a_model_with_scrambled_old_head_rows(trained, digits_shards, tmp_path, capsys):
    bad = tmp_path / "scrambled.onnx"
    scramble_head(trained["task3"], bad, rows=8)  # the 8 classes of tasks 0-2 answer each other's names
    report = tmp_path / "gate.json"
    rc, out, _ = run_main(capsys, "gate", str(bad), "--baseline", str(trained["task2"]), "--data",
                          str(digits_shards), "--report", str(report))  # fmt: skip
    assert rc == 3
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["exit_code"] == 3 and data["old_classes"]["drop"] > 2.0
    assert "gate: FAIL (exit 3)" in out and data["worst_classes"][0]["drop"] > 10.0


@pytest.mark.slow
def test_gate_refusals_are_one_line_and_write_nothing(trained, digits_shards, tmp_path, capsys):
    from onnx import TensorProto, helper, save

    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain))
    other = tmp_path / "other_shards"
    make_image_folder(tmp_path / "src", {c: 2 for c in "abc"}, {c: 1 for c in "abc"})
    assert main(["data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"), "--out",
                 str(other), "--tasks", "3", "--workers", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    report = tmp_path / "gate.json"
    new, old, shards = str(trained["task3"]), str(trained["task2"]), str(digits_shards)
    cases = {
        "non-sdlora baseline": (new, str(plain), shards, "has no sdlora metadata"),
        "baseline classes missing": (old, new, shards, f"{old} does not contain 2 of the 10 classes"),
        "another benchmark": (new, old, str(other), "are not the shard set"),
    }
    for why, (candidate, baseline, data, expected) in cases.items():
        rc, _, err = run_main(capsys, "gate", candidate, "--baseline", baseline, "--data", data, "--report",
                              str(report))  # fmt: skip
        assert rc == 2, why
        assert expected in error_line(err), (why, err)
        assert not report.exists(), why


@pytest.mark.slow
def test_triton_versions_and_rollback(trained, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "triton"
    files = [trained["task2"], trained["task3"], trained["root"] / "task3_again.onnx"]
    scramble_head(trained["task3"], files[2], rows=2)  # a third file, as a broken update would be
    for i, path in enumerate(files, start=1):
        rc, out, _ = run_main(capsys, "publish", str(path), "--triton", str(repo), "--name", "digits")
        assert rc == 0 and f"as version {i} of" in out
        config = text_format.Parse((repo / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == "digits" and config.version_policy.latest.num_versions == 1
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2", "3", "config.pbtxt", "labels.txt"]
    assert list(config.output[0].dims) == [-1]  # 8 then 10 classes: one config valid for every version
    # publishing a file that is already a version adds none; its bytes are never rewritten
    mtime = (repo / "digits" / "1" / "model.onnx").stat().st_mtime_ns
    assert run_main(capsys, "publish", str(files[0]), "--triton", str(repo), "--name", "digits")[0] == 0
    assert (repo / "digits" / "1" / "model.onnx").stat().st_mtime_ns == mtime and not (repo / "digits" / "4").exists()

    rc, out, _ = run_main(capsys, "rollback", "--triton", str(repo), "--name", "digits", "--version", "2")
    assert rc == 0 and "now serves version 2" in out
    config = text_format.Parse((repo / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    served = list(config.version_policy.specific.versions)
    assert served == [2]
    lineage = read_lineage(OnnxClassifier(repo / "digits" / str(served[0]) / "model.onnx").metadata, "v2")
    assert lineage.task == 3 and file_sha256(repo / "digits" / "2" / "model.onnx") == file_sha256(files[1])
    rc, _, err = run_main(capsys, "rollback", "--triton", str(repo), "--name", "digits", "--version", "7")
    assert rc == 2 and "published versions are [1, 2, 3]" in error_line(err)
    assert run_main(capsys, "rollback", "--triton", str(repo), "--name", "digits", "--latest")[0] == 0
    config = text_format.Parse((repo / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.version_policy.latest.num_versions == 1


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on a free 127.0.0.1 port; its URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_versions_with_lineage_and_champion_only_on_a_passing_gate(trained, digits_shards, mlflow_server,
                                                                           tmp_path, capsys):  # fmt: skip
    from mlflow import MlflowClient

    bad = tmp_path / "scrambled.onnx"
    scramble_head(trained["task3"], bad, rows=8)
    plan = [(trained["task2"], trained["task2"]), (bad, trained["task2"]), (trained["task3"], trained["task3"])]
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champions = []
    for i, (model, baseline) in enumerate(plan, start=1):
        report = tmp_path / f"gate{i}.json"
        rc, _, _ = run_main(capsys, "gate", str(model), "--baseline", str(baseline), "--data", str(digits_shards),
                            "--report", str(report))  # fmt: skip
        assert rc == (3 if model == bad else 0)
        rc, out, err = run_main(capsys, "publish", str(model), "--mlflow-uri", mlflow_server, "--name", "digits",
                                "--gate-report", str(report))  # fmt: skip
        assert rc == 0, err
        assert json.loads(out.strip().splitlines()[-1])["version"] == i
        champions.append(client.get_model_version_by_alias("digits", "champion").version)
    assert champions == ["1", "1", "3"]  # the scrambled version 2 never became champion
    for i, (model, _) in enumerate(plan, start=1):
        tags = client.get_model_version("digits", str(i)).tags
        lineage = read_lineage(OnnxClassifier(model, provider="cpu").metadata, str(model))
        assert tags["sdlora.sha256"] == file_sha256(model) and tags["sdlora.run_id"] == lineage.run_id
        assert tags["sdlora.task"] == str(lineage.task) and tags["sdlora.gate"] == ("failed" if i == 2 else "passed")
        assert tags["sdlora.data_fingerprint"] == lineage.data_fingerprint
    # a gate report about another file is refused, and registers nothing
    rc, _, err = run_main(capsys, "publish", str(trained["task3"]), "--mlflow-uri", mlflow_server, "--name",
                          "digits", "--gate-report", str(tmp_path / "gate1.json"))  # fmt: skip
    assert rc == 2 and "judged another file" in error_line(err)
    assert len(client.search_model_versions("name = 'digits'")) == 3
