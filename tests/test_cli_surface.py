"""The CLI behaves like its neighbours: --version, shell completion, -q/-v with a rank filter, --json, env vars."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from cli_helpers import ENV, error_line, run_main

from sdlora_dist.data import load_manifest
from sdlora_dist.logs import LEVEL_ENV, RankFilter


@pytest.fixture(autouse=True)
def _restore_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    # -q / -v export SDLORA_LOG_LEVEL for launched ranks: keep it from leaking into the next test
    monkeypatch.delenv(LEVEL_ENV, raising=False)


def test_version_comes_from_package_metadata(capsys):
    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"sdlora {version('sdlora-dist')}"


@pytest.mark.slow  # launches the CLI in subprocesses
def test_completion_script_and_completion(tmp_path):
    script = [sys.executable, "-m", "sdlora_dist.cli.main"]
    # typer reads the shell off the process tree unless its own switch makes --show-completion take one: under a
    # runner with no shell among its parents (nohup, a CI agent) detection fails and "bash" would be ignored
    shell_given = {**ENV, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run([*script, "--show-completion", "bash"], capture_output=True, text=True, env=shell_given,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "_SDLORA_COMPLETE=complete_bash" in shown.stdout
    # the script asks the program itself: answer a real completion request for "sdlora da"
    env = {**ENV, "_SDLORA_COMPLETE": "complete_bash", "COMP_WORDS": "sdlora da", "COMP_CWORD": "1"}
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["data"], done.stdout + done.stderr


def test_quiet_silences_progress_and_info(capsys, tmp_path):
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(tmp_path / "a"),
                          "--progress", "--workers", "1")  # fmt: skip
    assert rc == 0 and "img" in err  # the bar's unit, printed at close in a non-terminal
    os.environ.pop(LEVEL_ENV, None)
    rc, out, err = run_main(capsys, "-q", "data", "prepare", "--benchmark", "digits", "--out", str(tmp_path / "b"),
                            "--progress", "--workers", "1")  # fmt: skip
    assert rc == 0 and err == ""
    assert "10 classes in" in out  # the result line is stdout, not logging
    assert os.environ[LEVEL_ENV] == "WARNING"  # what launched ranks inherit


def test_quiet_and_verbose_together_is_one_error_line(capsys):
    rc, _, err = run_main(capsys, "-q", "-v", "config-docs")
    assert rc == 2
    assert "-q and -v" in error_line(err)


def test_rank_filter_passes_rank_zero_and_marked_records(monkeypatch):
    record = logging.LogRecord("sdlora_dist", logging.INFO, __file__, 1, "x", None, None)
    monkeypatch.setenv("RANK", "1")
    assert not RankFilter().filter(record)
    record.all_ranks = True
    assert RankFilter().filter(record)
    monkeypatch.setenv("RANK", "0")
    del record.all_ranks
    assert RankFilter().filter(record)


def test_runs_root_from_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SDLORA_RUNS_ROOT", str(tmp_path / "elsewhere"))
    rc, _, err = run_main(capsys, "export", str(tmp_path / "m.onnx"))
    assert rc == 2
    assert str(tmp_path / "elsewhere") in error_line(err)


def test_data_inspect_json_and_help_wording(capsys, digits_shards: Path):
    rc, out, _ = run_main(capsys, "data", "inspect", str(digits_shards), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["benchmark"] == "digits" and len(info["tasks"]) == 5
    assert sum(len(t["classes"]) for t in info["tasks"]) == info["num_classes"] == 10
    manifest = load_manifest(digits_shards)
    assert [t["train"] for t in info["tasks"]] == [manifest.num_samples("train", t) for t in range(5)]
    rc, out, _ = run_main(capsys, "data", "--help")
    assert rc == 0 and "per-task" not in out and "grouped by class" in out


def test_report_json_lists_the_files(capsys, tmp_path):
    from sdlora_dist.metrics import AccuracyLog
    from sdlora_dist.records import RunProgress, TaskRecord, TrainStats

    log = AccuracyLog()
    log.add_row([9], [10])
    record = TaskRecord(task=0, classes=2, rank=4, consolidation_of_previous=None, magnitudes={"task_00": [1.0]},
                        train=TrainStats(6, 0.5, 96, 0), world_size=1, time_s={"train": 1.0})  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(RunProgress(log, [record]).to_dict()))
    rc, out, _ = run_main(capsys, "report", str(tmp_path), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["aggregate"] is None
    assert info["files"][0] == str(tmp_path / "report" / "report.md") and all(Path(f).is_file() for f in info["files"])
