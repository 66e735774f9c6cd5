"""``sdlora report``: real PNG files and a Markdown summary from a run's metrics.json; bad input exits 2."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

from sdlora_dist.metrics import AccuracyLog


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


def cli(*args: str) -> tuple[int, str, str]:
    from sdlora_dist.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


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
