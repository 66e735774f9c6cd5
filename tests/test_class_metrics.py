"""Per-class accuracy and the confusion matrix: counts, task grouping, top confusions, the report at 200 classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdlora_dist.class_metrics import class_accuracy, class_counts, task_confusion, top_confusions
from sdlora_dist.records import RunProgress

# 4 classes in 2 tasks of 2; rows: true class, columns: predicted
CONFUSION = [[8, 2, 0, 0], [1, 9, 0, 0], [0, 3, 5, 2], [0, 0, 0, 0]]


def test_counts_accuracy_and_task_grouping():
    correct, totals = class_counts(CONFUSION)
    assert (correct, totals) == ([8, 9, 5, 0], [10, 10, 10, 0])
    assert class_accuracy(correct, totals) == [80.0, 90.0, 50.0, None]
    grouped = task_confusion(CONFUSION, [2, 2])
    np.testing.assert_allclose(grouped, [[100.0, 0.0], [30.0, 70.0]])  # task 1 lost 3 of its 10 samples to task 0


def test_top_confusions_rank_off_diagonal_counts():
    top = top_confusions(CONFUSION, ["a", "b", "c", "d"], k=3)
    assert [(c["true_name"], c["predicted_name"], c["count"]) for c in top] == [("c", "b", 3), ("a", "b", 2),
                                                                                 ("c", "d", 2)]  # fmt: skip
    assert top[0]["percent"] == pytest.approx(30.0)


def test_metrics_json_sections():
    progress = RunProgress(class_correct=[[8, 9], [8, 9, 5, 0]], class_totals=[10, 10, 10, 0], confusion=CONFUSION)
    out = progress.to_dict()
    assert out["per_class"]["accuracy"] == [[80.0, 90.0], [80.0, 90.0, 50.0, None]]
    assert out["confusion"] == {"after_task": 1, "matrix": CONFUSION}
    assert "per_class" not in RunProgress().to_dict()  # nothing recorded: the section is absent, not empty


def test_report_stays_readable_at_200_classes(tmp_path):
    from sdlora_dist.metrics import AccuracyLog
    from sdlora_dist.records import TaskRecord, TrainStats
    from sdlora_dist.report import write_report

    rng = np.random.default_rng(0)
    n, tasks = 200, 10
    confusion = np.diag(rng.integers(5, 20, n))
    confusion[17, 3] = 40  # the worst confusion, from a late class to an early one
    confusion[150, 151] = 25
    log, correct = AccuracyLog(), class_counts(confusion.tolist())[0]
    totals = confusion.sum(axis=1).tolist()
    for t in range(tasks):
        log.add_row([sum(correct[j * 20 : j * 20 + 20]) for j in range(t + 1)],
                    [sum(totals[j * 20 : j * 20 + 20]) for j in range(t + 1)])  # fmt: skip
    records = [TaskRecord(task=t, classes=20, rank=4, consolidation_of_previous=None, magnitudes={"task_00": [1.0]},
                          train=TrainStats(6, 0.5, 96, 0), world_size=1, time_s={"train": 1.0})
               for t in range(tasks)]  # fmt: skip
    progress = RunProgress(log, records, [correct] * tasks, totals, confusion.tolist())
    (tmp_path / "metrics.json").write_text(json.dumps(progress.to_dict()))
    (tmp_path / "run.json").write_text(json.dumps({"class_names": [f"class{i}" for i in range(n)]}))
    files = write_report(tmp_path)
    with Image.open(files.images["confusion.png"]) as image:
        assert image.size[0] <= 2000 and image.size[1] <= 1000  # a 200 x 200 heatmap would need far more
    assert "class_accuracy.png" in files.images
    text = files.markdown.read_text()
    assert "| 17 class17 | 3 class3 | 40 |" in text and "![confusion](confusion.png)" in text
