"""Nothing lost on a cluster: a stop before the first checkpoint keeps the run, SIGTERM preemption checkpoints and
exits resumable, time-based engine checkpoints (real CLI runs on digits, gloo ranks on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import CLI, ENV, error_line, metrics, run_main, sdlora
from cli_helpers import sets as tiny_sets
from shard_servers import http_server


def sets(*extra: str) -> list[str]:
    """The tiny settings with two steps per task and the default checkpointing (none mid-task), then ``extra``."""
    return tiny_sets("train.max_steps_per_epoch=2", *extra)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """digits in 2 tasks."""
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("shards") / "digits2"
    prepare("digits", None, out, tasks=2, progress=False)
    return out


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory) -> list:
    """The accuracy matrix of an uninterrupted one-rank run."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), *sets())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)["accuracy"]["matrix"]


def start(*args: str) -> subprocess.Popen:
    """``sdlora ...`` in its own session (a terminal job or a batch step), output captured."""
    return subprocess.Popen(
        [*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_running(run_dir: Path, n: int = 1) -> list[int]:
    """Pids of ranks 0..n-1 once each has recorded itself as running."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        paths = [run_dir / "logs" / f"rank_{r}.json" for r in range(n)]
        if all(p.exists() and p.stat().st_size for p in paths):
            data = [json.loads(p.read_text()) for p in paths]
            if all(d["status"] == "running" for d in data):
                return [d["pid"] for d in data]
        time.sleep(0.05)
    raise AssertionError("ranks did not start")


def resume_as_printed(line: str, *extra: str) -> subprocess.CompletedProcess:
    """Run the ``sdlora train --resume DIR`` command the error line prints, as a user pasting it would."""
    command = line.split("resume with: ", 1)[1].split(" (full log: ")[0].split(";")[0].strip()
    argv = shlex.split(command)
    assert argv[:3] == ["sdlora", "train", "--resume"], line
    return sdlora(*argv[1:], *extra)


def assert_kept(run_dir: Path) -> None:
    """The run directory, its config and the ranks' records survived the stop (one in-process rank logs to the
    console, several to logs/rank_N.log)."""
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank_0.json").is_file()
    assert not (run_dir / "tasks").exists() or not any((run_dir / "tasks").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# A stop before the first checkpoint keeps the run


@pytest.mark.slow
def test_ctrl_c_during_task_0_keeps_the_run_and_the_printed_resume_matches(shards, baseline, tmp_path):
    run_dir = tmp_path / "run"
    job = start("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), *sets())
    wait_running(run_dir)
    os.killpg(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    line = error_line(err)
    assert line == f"error: interrupted (Ctrl-C); resume with: sdlora train --resume {run_dir}"
    assert_kept(run_dir)
    resumed = resume_as_printed(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir)["accuracy"]["matrix"] == baseline


@pytest.mark.slow
def test_killed_rank_during_start_keeps_the_run_and_its_log(shards, baseline, tmp_path):
    run_dir = tmp_path / "run"
    job = start("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                *sets())  # fmt: skip
    pids = wait_running(run_dir, 2)
    os.kill(pids[1], signal.SIGKILL)
    _, err = job.communicate(timeout=180)
    assert job.returncode == 1, err[-3000:]
    line = error_line(err)
    log = Path(line.split("(full log: ", 1)[1].rstrip(")"))
    assert log == run_dir / "logs" / "rank_1.log" and log.is_file()
    assert_kept(run_dir)
    resumed = sdlora("train", "--resume", str(run_dir), "--gpus-per-node", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir)["accuracy"]["matrix"] == baseline


@pytest.mark.slow
def test_http_server_gone_during_task_0_keeps_the_run_and_resume_matches(shards, baseline, tmp_path):
    run_dir = tmp_path / "run"
    with http_server(shards) as server:
        server.gone = True  # manifest.json answers, every shard read is cut: the server went away in task 0
        proc = sdlora("train", "-b", "digits", "--data", server.url, "--run-dir", str(run_dir), *sets())
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc.stderr)
        assert "unreachable" in line and server.url in line and "sdlora data prepare" not in line, line
        assert_kept(run_dir)
        server.gone = False  # it is back
        resumed = resume_as_printed(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir)["accuracy"]["matrix"] == baseline


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM preemption and time-based checkpoints (2 ranks)

PREEMPT = ("train.max_steps_per_epoch=30", "train.epochs=2")  # 60 steps per task: time to signal mid-task


def checkpoint_tags(log: Path) -> list[str]:
    """The engine checkpoints a rank's log says it wrote, in order."""
    # the progress bar shares rank 0's log without newlines: search the text, not its lines
    return re.findall(r"\[rank \d+\] task \d+: engine checkpoint (step_\d+) written", log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def two_rank_baseline(shards, tmp_path_factory) -> tuple[list, Path]:
    """An uninterrupted 2-rank run with a time-based checkpoint every 0.2 s: (matrix, run dir).

    A task of 60 tiny-ViT steps takes about 1 s on an idle 2-core machine, so a 1 s interval fired once or not at
    all depending on the load (a flaky test); 0.2 s fires several times per task whatever the speed."""
    run_dir = tmp_path_factory.mktemp("baseline2") / "run"
    proc = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                  *sets(*PREEMPT, "train.checkpoint_every_s=0.2"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)["accuracy"]["matrix"], run_dir


@pytest.mark.slow
def test_time_based_checkpoint_fires_on_every_rank_at_the_same_step(two_rank_baseline):
    _, run_dir = two_rank_baseline
    tags = [checkpoint_tags(run_dir / "logs" / f"rank_{r}.log") for r in range(2)]
    assert len(tags[0]) >= 2 and tags[0] == tags[1], tags  # rank 0's clock decided, both ranks saved at the same steps


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resume_redoes_at_most_one_step(shards, two_rank_baseline, tmp_path):
    run_dir = tmp_path / "run"
    job = start("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                *sets(*PREEMPT))  # fmt: skip
    log = run_dir / "logs" / "rank_0.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.is_file() and "task 0:" in log.read_text(errors="replace")):
        time.sleep(0.05)
    signalled = time.time()
    os.killpg(job.pid, signal.SIGTERM)  # what SLURM does: every process of the job gets it
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-3000:]
    line = error_line(err)
    assert "preempted (SIGTERM) after step" in line and "task 0" in line, line
    stopped_after = int(line.split("after step ")[1].split()[0])
    tag = run_dir / "engine" / "task_00" / f"step_{stopped_after:08d}"
    assert tag.is_dir() and min(p.stat().st_mtime for p in tag.iterdir()) >= signalled  # written after the signal
    assert [checkpoint_tags(run_dir / "logs" / f"rank_{r}.log") for r in range(2)] == [[tag.name]] * 2
    resumed = resume_as_printed(line, "--gpus-per-node", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    where = resumed.stderr.split("task 0: resumed from engine checkpoint ")[1].split(")")[0]
    epoch, step = int(where.split("epoch ")[1].split(",")[0]), int(where.split("step ")[1])
    redone = stopped_after - (epoch * 30 + step)  # steps done before the stop that the resumed run does again
    assert 0 <= redone <= 1, (stopped_after, where)
    assert metrics(run_dir)["accuracy"]["matrix"] == two_rank_baseline[0]


def test_second_sigterm_stops_at_once_and_copies_of_the_first_count_once(monkeypatch):
    from sdlora_dist.jobs import preempt

    stops: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    try:
        preempt.install(lambda: stops.append(1))
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy of the same request
            assert preempt.requested() and stops == []  # honoured at the next step boundary
            monkeypatch.setattr(preempt, "DUPLICATE_S", 0.0)
            os.kill(os.getpid(), signal.SIGTERM)  # a second request: at once
            assert stops == [1]
        preempt.install(lambda: stops.append(2))
        os.kill(os.getpid(), signal.SIGTERM)  # outside a training loop: at once, as before
        assert stops == [1, 2]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_resume_or_start_is_one_command_for_the_first_start_and_every_requeue(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = ["train", "--resume-or-start", "--run-dir", str(run_dir), "-b", "digits", "--data", str(shards),
               *sets("train.tasks=1")]  # fmt: skip
    first = sdlora(*command)
    assert first.returncode == 0 and (run_dir / "tasks" / "task_00").is_dir(), first.stderr[-3000:]
    again = sdlora(*command)  # the requeued job: the same line resumes
    assert again.returncode == 0 and "resume: tasks 0..0 are complete" in again.stderr, again.stderr[-3000:]
    changed = sdlora(*command, "--set", "train.lr=0.5")
    assert changed.returncode == 2 and "train.lr" in error_line(changed.stderr)
    rc, _, err = run_main(capsys, "train", "--resume-or-start", "-b", "digits", "--data", str(shards))
    assert rc == 2 and "--resume-or-start needs --run-dir DIR" in error_line(err)
