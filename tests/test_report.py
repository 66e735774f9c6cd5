"""``sdlora report``: real PNG files and a Markdown summary from a run's metrics.json; bad input exits 2."""

from __future__ import annotations

import json

import pytest
from cli_helpers import cli
from PIL import Image

from sdlora_dist import report as rep
from sdlora_dist import report_runs as agg
from sdlora_dist.errors import UserError
from sdlora_dist.metrics import AccuracyLog
from sdlora_dist.records import TaskRecord


def make_run(run_dir, tasks: int = 3) -> dict:
    """A run directory shaped like 'sdlora train' writes it (metrics.json from the real AccuracyLog)."""
    log = AccuracyLog()
    records = []
    for t in range(tasks):
        log.add_row([40 - 5 * (t - j) for j in range(t + 1)], [50] * (t + 1))
        decision = None if t == 0 else {"task": f"task_{t - 1:02d}", "action": "frozen", "rank": 4,
                                        "relative_residual": 0.5, "coefficients": [], "magnitudes": {}}  # fmt: skip
        records.append({
            "task": t, "classes": 2, "rank": 4, "consolidation_of_previous": decision,
            "magnitudes": {f"task_{k:02d}": [0.8 + 0.1 * k - 0.05 * (t - k)] for k in range(t + 1)},
            "train": {"steps": 10, "final_loss": 0.3, "images": 320, "corrupt_skipped": 0}, "world_size": 2,
            "time_s": {"consolidate": 0.01, "train": 2.0 + t, "eval": 0.2, "checkpoint": 0.05},
        })  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"accuracy": log.to_dict(), "tasks": records}
    (run_dir / "metrics.json").write_text(json.dumps(data))
    (run_dir / "run.json").write_text(json.dumps({"benchmark": "digits", "config_hash": "abc", "version": "0.1.0"}))
    return data


@pytest.mark.slow  # renders plots: over 2 s
def test_report_writes_plots_and_summary(tmp_path):
    data = make_run(tmp_path / "run")
    code, out, err = cli("report", str(tmp_path / "run"))
    assert code == 0, err
    folder = tmp_path / "run" / "report"
    assert out.split() == [str(folder / n) for n in ("report.md", "accuracy_matrix.png", "accuracy_curve.png",
                                                    "magnitudes.png", "time_per_task.png")]  # fmt: skip
    for name in ("accuracy_matrix.png", "accuracy_curve.png", "magnitudes.png", "time_per_task.png"):
        with Image.open(folder / name) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 250
    text = (folder / "report.md").read_text()
    acc = data["accuracy"]
    assert f"{acc['acc']:.2f}" in text and f"{acc['aaa']:.2f}" in text and f"{acc['forgetting']:.2f}" in text
    assert "| 2 | 60.00 | 70.00 | 80.00 |" in text  # the last matrix row (30, 35, 40 of 50), numeric task order
    assert "![accuracy matrix](accuracy_matrix.png)" in text
    # a second report replaces the folder as a whole, leaving no temporary folder behind
    assert cli("report", str(tmp_path / "run"))[0] == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json", "report", "run.json"]


@pytest.mark.parametrize("problem", ["missing_dir", "no_metrics", "corrupt", "empty_matrix", "foreign_out"])
def test_report_bad_input(tmp_path, problem):
    run = tmp_path / "run"
    args = ["report", str(run)]
    if problem != "missing_dir":
        run.mkdir()
    if problem == "corrupt":
        (run / "metrics.json").write_text("{not json")
    if problem == "empty_matrix":
        (run / "metrics.json").write_text(json.dumps({"accuracy": {"matrix": []}, "tasks": []}))
    if problem == "foreign_out":
        make_run(run)
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        args += ["--out", str(tmp_path / "mine")]
    code, _, err = cli(*args)
    expected = {"missing_dir": "does not exist", "no_metrics": "train first", "corrupt": "not valid JSON",
                "empty_matrix": "train first", "foreign_out": "did not write"}[problem]  # fmt: skip
    assert code == 2 and expected in err and err.startswith("error: ")
    if problem == "foreign_out":
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def make_kd_run(run_dir, slots: int = 1) -> dict:
    """Four tasks: task_00 and task_01 frozen, task_02 absorbed by KD (gone from later records), task_03 open.

    ``slots`` > 1 gives per-layer magnitudes (one value per adapted matrix), as ``adapter.magnitude=per_layer`` does.
    """
    from sdlora_dist.config import load_config, save_config

    log = AccuracyLog()
    for t, row in enumerate([[45], [30, 44], [28, 40, 41], [25, 38, 39, 43]]):
        log.add_row(row, [50, 50, 48, 50][: t + 1])

    def alphas(value: float) -> list[float]:
        return [value + 0.01 * s for s in range(slots)]  # slot s of a per-layer magnitude

    def closed(key: str, action: str = "frozen", residual: float | None = None) -> dict:
        return {"task": key, "action": action, "rank": 4, "relative_residual": residual, "coefficients": [],
                "magnitudes": {}}  # fmt: skip

    mags = [
        {"task_00": alphas(0.8)},
        {"task_00": alphas(0.11), "task_01": alphas(0.79)},
        {"task_00": alphas(0.12), "task_01": alphas(0.105), "task_02": alphas(0.81)},
        {"task_00": alphas(0.13), "task_01": alphas(0.15), "task_03": alphas(0.77)},  # task_02 absorbed
    ]
    decisions = [None, closed("task_00"), closed("task_01", residual=0.4), closed("task_02", "absorbed", 2e-4)]
    records = [
        {"task": t, "classes": 2, "rank": [4, 4, 2, 2][t], "consolidation_of_previous": decisions[t],
         "magnitudes": mags[t], "train": {"steps": 3, "final_loss": 0.5 - 0.1 * t, "images": 96, "corrupt_skipped": 0},
         "world_size": 2, "time_s": {"consolidate": 0.1 * t, "train": 1.5, "eval": 0.25, "checkpoint": 0.05}}
        for t in range(4)
    ]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"accuracy": log.to_dict(), "tasks": records}
    (run_dir / "metrics.json").write_text(json.dumps(data))
    cfg = load_config(overrides=["adapter.kd=true", "adapter.rank_schedule=[[0, 4], [2, 2]]",
                                 f"adapter.magnitude={'per_layer' if slots > 1 else 'shared'}"])  # fmt: skip
    save_config(cfg, run_dir / "config.yaml")
    return data


def test_kd_rr_run_report_numbers(tmp_path):
    data = make_kd_run(tmp_path / "run")
    tasks = [TaskRecord.from_dict(r, "metrics.json") for r in data["tasks"]]
    # Fig. 3 series: a direction appears from the task after it was frozen; the absorbed task_02 never does
    assert rep.magnitude_series(tasks) == {"task_00": ([1, 2, 3], [[0.11], [0.12], [0.13]]),
                                           "task_01": ([2, 3], [[0.105], [0.15]])}  # fmt: skip
    assert [(t, k) for t, k, _ in rep.open_magnitudes(tasks)] == [(0, "task_00"), (1, "task_01"), (2, "task_02"),
                                                                   (3, "task_03")]  # fmt: skip
    assert rep.task_mean_curve(data["accuracy"]["matrix"])[1] == pytest.approx((60 + 88) / 2)

    files = rep.write_report(tmp_path / "run", tmp_path / "out")
    assert files.out_dir == tmp_path / "out" and all(p.is_file() for p in files.paths())
    text = files.markdown.read_text()
    acc = data["accuracy"]
    for key in ("acc", "aaa", "mean_task_acc", "forgetting", "bwt"):
        assert f"| {acc[key]:.2f} " in text or f" {acc[key]:.2f} |" in text, key
    assert "| 3 | 50.00 | 76.00 | 81.25 | 86.00 | " in text  # last row: 25/50, 38/50, 39/48, 43/50
    assert "| 2 | 2 | 2 | 0.8100 | absorbed | 0.0002 | 0.3000 | 2.0 |" in text  # RR rank 2, KD absorbed
    assert "| 1 | 2 | 4 | 0.7900 | frozen | 0.4 |" in text
    assert "| 3 | 2 | 2 | 0.7700 | open (last task) |" in text
    assert "KD: on, threshold 0.0009" in text and "[[0, 4], [2, 2]]" in text and "world size: 2" in text
    assert "Per-layer" not in text
    for image in files.images.values():  # linked relatively, so the folder can be moved or published as is
        assert f"]({image.name})" in text


def test_per_layer_magnitudes_are_plotted_as_their_mean(tmp_path):
    data = make_kd_run(tmp_path / "run", slots=6)
    assert rep.magnitude_slots([TaskRecord.from_dict(r, "metrics.json") for r in data["tasks"]]) == 6
    files = rep.write_report(tmp_path / "run")
    assert "Per-layer magnitudes (6 slots per task)" in files.markdown.read_text()
    with Image.open(files.images["magnitudes.png"]) as img:
        assert img.format == "PNG" and img.width >= 800


@pytest.mark.slow  # renders plots: over 2 s
def test_failed_report_leaves_the_previous_one_untouched(tmp_path, monkeypatch):
    make_run(tmp_path / "run")
    before = rep.write_report(tmp_path / "run").markdown.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(rep, "plot_time_per_task", broken)  # fails after three PNGs are already in the temp folder
    make_run(tmp_path / "run", tasks=4)
    with pytest.raises(RuntimeError, match="disk full"):
        rep.write_report(tmp_path / "run")
    assert (tmp_path / "run" / "report" / "report.md").read_text() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json", "report", "run.json"]


@pytest.mark.parametrize(
    "problem", ["no_tasks_section", "ragged_matrix", "records_mismatch", "record_lacks_key", "out_is_file"]
)
def test_damaged_metrics_are_user_errors(tmp_path, problem):
    data = make_run(tmp_path / "run")
    out = None
    if problem == "no_tasks_section":
        del data["tasks"]
    if problem == "ragged_matrix":
        data["accuracy"]["matrix"][1] = [1.0]
    if problem == "records_mismatch":
        data["tasks"] = data["tasks"][:2]
    if problem == "record_lacks_key":
        del data["tasks"][1]["time_s"]
    if problem == "out_is_file":
        out = tmp_path / "file.txt"
        out.write_text("x")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(data))
    expected = {"no_tasks_section": "'tasks'", "ragged_matrix": "3 x 3", "records_mismatch": "2 task records",
                "record_lacks_key": "metrics.json: the record of task 1 lacks \\['time_s'\\]",
                "out_is_file": "is a file"}[problem]  # fmt: skip
    with pytest.raises(UserError, match=expected):
        rep.write_report(tmp_path / "run", out)


# ---------------------------------------------------------------------------------------------------------------------
# Several runs of one setting


def make_seed_run(run_dir, seed: int, shift: float, tasks: int = 3, sets: tuple[str, ...] = ()) -> dict:
    """A finished run of the digits recipe with ``train.seed=seed``; its accuracies are ``shift`` points higher."""
    from sdlora_dist.config import load_config, save_config

    data = make_run(run_dir, tasks=tasks)
    log = AccuracyLog()
    for t in range(tasks):  # correct counts of 100-sample groups, so every percentage is exact
        log.add_row([int(60 + shift - 5 * (t - j)) for j in range(t + 1)], [100] * (t + 1))
    data["accuracy"] = log.to_dict()
    (run_dir / "metrics.json").write_text(json.dumps(data))
    cfg = load_config(overrides=[f"train.seed={seed}", f"run_dir={run_dir}", *sets])
    save_config(cfg, run_dir / "config.yaml")
    return data


def test_report_aggregates_three_seeds(tmp_path):
    import numpy as np

    runs = [tmp_path / "runs" / f"digits-seed{s}" for s in (1, 2, 3)]
    datas = [make_seed_run(r, seed=s, shift=2.0 * s) for r, s in zip(runs, (1, 2, 3), strict=True)]
    # a run resumed on another machine (other workers, timeout, shard path) still belongs to the setting
    make_seed_run(runs[2], seed=3, shift=6.0, sets=("data.num_workers=7", "train.timeout_s=99", "data.shards=s3"))
    code, out, err = cli("report", *map(str, runs), "--out", str(tmp_path / "agg"))
    assert code == 0, err
    numbers = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    for key in ("acc", "aaa", "forgetting"):
        values = [d["accuracy"][key] for d in datas]
        assert numbers["summary"][key]["mean"] == pytest.approx(np.mean(values))
        assert numbers["summary"][key]["std"] == pytest.approx(np.std(values, ddof=1))
    acc = numbers["summary"]["acc"]
    assert acc["mean"] == pytest.approx(59.0) and acc["std"] == pytest.approx(2.0)  # final rows 57, 59, 61
    assert numbers["varying"] == {"train.seed": [1, 2, 3]}
    assert numbers["top1_mean"] == pytest.approx(np.mean(numbers["top1_curves"], axis=0).tolist())
    text = (tmp_path / "agg" / "report.md").read_text()
    assert "| **mean ± std (3 runs)** | 59.00 ± 2.00 |" in text and "digits-seed2 (seed 2)" in text
    assert "![accuracy curves](accuracy_curves.png)" in text
    assert "59.00 ± 2.00" in out and out.split()[-3:] == [str(tmp_path / "agg" / n) for n in agg.AGGREGATE_FILES]
    with Image.open(tmp_path / "agg" / "accuracy_curves.png") as img:
        assert img.format == "PNG" and img.width >= 600
    # a quoted glob, default output beside the runs; the next glob over the folder skips that report
    assert cli("report", str(tmp_path / "runs" / "digits-seed*"))[0] == 0
    (default,) = (tmp_path / "runs").glob("report-digits-*")  # one folder per setting, named by its hash
    assert json.loads((default / "aggregate.json").read_text())["summary"] == numbers["summary"]
    code, _, err = cli("report", str(tmp_path / "runs" / "*"))
    assert code == 0, err


@pytest.mark.parametrize(
    "problem", ["rank_and_lr", "unfinished", "data_tasks", "split", "one_run", "no_config", "twice"]
)
def test_report_refuses_runs_of_different_settings(tmp_path, problem):
    runs = [tmp_path / f"r{s}" for s in (1, 2, 3)]
    sets = {"rank_and_lr": ("adapter.rank=4", "train.lr=0.5"), "data_tasks": ("data.tasks=2",)}.get(problem, ())
    for i, r in enumerate(runs):
        short = problem in ("unfinished", "data_tasks") and i == (1 if problem == "unfinished" else 2)
        make_seed_run(r, seed=i, shift=i, tasks=2 if short else 3, sets=sets if i == 2 else ())
    if problem == "split":  # the same number of tasks, another split of the classes
        data = json.loads((runs[1] / "metrics.json").read_text())
        data["tasks"][0]["classes"] = 4
        (runs[1] / "metrics.json").write_text(json.dumps(data))
    if problem == "no_config":
        (runs[0] / "config.yaml").unlink()
    args = {"one_run": [str(runs[0] / "*")], "twice": [str(runs[0]), str(runs[1]), str(runs[0])]}
    code, out, err = cli("report", *args.get(problem, map(str, runs)), "--out", str(tmp_path / "agg"))
    expected = {
        "rank_and_lr": f"adapter.rank ({runs[0]}: 10, {runs[2]}: 4); train.lr ({runs[0]}: 0.01, {runs[2]}: 0.5)",
        "unfinished": f"{runs[1]} is not finished",
        # a finished run of another split evaluates fewer tasks: the key is named, it is not called unfinished
        "data_tasks": f"data.tasks ({runs[0]}: None, {runs[2]}: 2)",
        "split": "differ in classes per task",
        "one_run": "matches no run directory",
        "no_config": "has no config.yaml",
        "twice": "named twice",
    }[problem]
    assert code == 2 and expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is not finished" not in err or problem == "unfinished"
    assert not (tmp_path / "agg").exists()


def test_aggregates_of_two_settings_keep_their_own_folders(tmp_path):
    paper = [tmp_path / "runs" / f"paper-s{s}" for s in (1, 2)]
    official = [tmp_path / "runs" / f"official-s{s}" for s in (1, 2)]
    for s, (a, b) in enumerate(zip(paper, official, strict=True)):
        make_seed_run(a, seed=s, shift=s)
        make_seed_run(b, seed=s, shift=10 + s, sets=("adapter.preset=official",))
    assert cli("report", *map(str, paper))[0] == 0
    assert cli("report", *map(str, official))[0] == 0
    folders = sorted((tmp_path / "runs").glob("report-digits-*"))
    assert len(folders) == 2, folders  # the second setting did not replace the first one's report
    accs = sorted(json.loads((f / "aggregate.json").read_text())["summary"]["acc"]["mean"] for f in folders)
    assert accs == [pytest.approx(55.5), pytest.approx(65.5)]  # final rows: 55 + shift on average
    assert cli("report", *map(str, paper))[0] == 0  # the same setting again replaces its own folder
    assert len(list((tmp_path / "runs").glob("report-digits-*"))) == 2
