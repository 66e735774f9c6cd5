"""Inject faults into real 2-rank ``sdlora train`` runs (digits, gloo on CPU) and record what the user sees.

    python bench/fault_table.py [--out bench/results/fault_table.json] [--only NAME,...]

For each fault: the console lines (the last one and how many), the exit code, the seconds from the injection to the
exit of ``sdlora train``, whether any rank outlived it, and what was lost: whether ``--resume`` then finishes the run
(for faults that leave a resumable run) and whether partial files were left behind. The full-disk and read-only
cases mount a small tmpfs as the run directory and need root (CAP_SYS_ADMIN); without it they are recorded as
not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cli_helpers import CLI, ENV, TINY, sets  # noqa: E402  (the tests' tiny settings: one source)
from shard_servers import http_server, s3_server  # noqa: E402  (the tests' servers on 127.0.0.1)

# whole epochs (no step cap), checkpoints every 5 steps, a short collective timeout: faults land mid-task
FAULT_RUN = ("train.epochs=3", "train.max_steps_per_epoch=null", "train.checkpoint_every=5", "train.timeout_s=30")


def _train(shards: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [*CLI, "train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2"]
    return subprocess.Popen([*cmd, *sets(*FAULT_RUN), *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    out = []
    for r in (0, 1):
        path = run_dir / "logs" / f"rank_{r}.json"
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            return []
    return out


def _wait_training(run_dir: Path, job: subprocess.Popen, timeout: float = 300) -> list[int]:
    """Pids of both ranks once they have taken an engine checkpoint of task 0 (so there is work to lose)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        recs = _records(run_dir)
        engine = run_dir / "engine" / "task_00"
        if recs and all(r["status"] == "running" for r in recs) and engine.is_dir() and any(engine.glob("step_*")):
            return [r["pid"] for r in recs]
        time.sleep(0.05)
    raise RuntimeError(
        f"training did not reach a checkpoint: {job.poll()} {job.stderr.read()[-2000:] if job.stderr else ''}"
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _finish(job: subprocess.Popen, injected: float, pids: list[int]) -> dict[str, Any]:
    out, err = job.communicate(timeout=300)
    seconds = time.monotonic() - injected
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    return {
        "exit_code": job.returncode,
        "seconds_to_exit": round(seconds, 1),
        "ranks_alive_after_15s": sum(_alive(p) for p in pids),
        "last_line": lines[-1] if lines else "",
        "console_lines": len(lines),
        "traceback_on_console": "Traceback" in out + err,
    }


def _resume(run_dir: Path) -> dict[str, Any]:
    """Whether the run resumes and finishes, and what it had to redo."""
    partial = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    done_before = sorted(p.name for p in (run_dir / "tasks").glob("task_*")) if (run_dir / "tasks").is_dir() else []
    start = time.monotonic()
    res = subprocess.run([*CLI, "train", "--resume", str(run_dir), "--gpus-per-node", "2"], env=ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    resumed_line = next((ln for ln in res.stderr.splitlines() if "resumed from engine checkpoint" in ln), "")
    return {
        "resume_exit_code": res.returncode,
        "resume_seconds": round(time.monotonic() - start, 1),
        "tasks_kept": done_before,
        "resumed_from": resumed_line.strip(),
        "partial_files_left": partial,
    }


# --------------------------------------------------------------------------------------------------------------------
# Faults


def kill_rank(shards: Path, run_dir: Path) -> dict[str, Any]:
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    os.kill(pids[1], signal.SIGKILL)
    return {**_finish(job, time.monotonic(), pids), **_resume(run_dir)}


def _kill_frontdoor(shards: Path, run_dir: Path, whole_group: bool) -> dict[str, Any]:
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    injected = time.monotonic()
    if whole_group:
        os.killpg(job.pid, signal.SIGKILL)  # front door and launcher; the ranks sit in torchrun's own sessions
    else:
        os.kill(job.pid, signal.SIGKILL)
    result = _finish(job, injected, pids)
    gone = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - gone < 15:
        time.sleep(0.05)
    result["seconds_until_no_rank"] = round(time.monotonic() - injected, 1)
    return {**result, **_resume(run_dir)}


def kill_launcher(shards: Path, run_dir: Path) -> dict[str, Any]:
    return _kill_frontdoor(shards, run_dir, whole_group=False)


def kill_whole_job(shards: Path, run_dir: Path) -> dict[str, Any]:
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    injected = time.monotonic()
    os.killpg(job.pid, signal.SIGKILL)
    for pid in pids:  # every process of the job, ranks included, at once
        os.kill(pid, signal.SIGKILL)
    result = _finish(job, injected, pids)
    return {**result, **_resume(run_dir)}


def _signal(shards: Path, run_dir: Path, sig: int, group: bool) -> dict[str, Any]:
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    injected = time.monotonic()
    (os.killpg if group else os.kill)(job.pid, sig)
    return {**_finish(job, injected, pids), **_resume(run_dir)}


def sigint(shards: Path, run_dir: Path) -> dict[str, Any]:
    return _signal(shards, run_dir, signal.SIGINT, group=True)  # a terminal's Ctrl-C reaches the foreground group


def sigterm(shards: Path, run_dir: Path) -> dict[str, Any]:
    return _signal(shards, run_dir, signal.SIGTERM, group=False)  # a scheduler signals the job's main process


def preemption(shards: Path, run_dir: Path) -> dict[str, Any]:
    """SIGTERM to every process of the job (SLURM's preemption): checkpoint at the step boundary, exit 143."""
    result = _signal(shards, run_dir, signal.SIGTERM, group=True)
    last = result["last_line"]
    if "after step " in last and "(epoch " in result["resumed_from"]:
        stopped = int(last.split("after step ")[1].split()[0])
        where = result["resumed_from"].split("(epoch ")[1]
        epoch, step = int(where.split(",")[0]), int(where.split("step ")[1].rstrip(")"))
        steps = _steps_per_epoch(run_dir)
        result["steps_redone"] = stopped - (epoch * steps + step)
    return result


def _steps_per_epoch(run_dir: Path) -> int:
    """Optimizer steps per epoch of task 0 of the run (what the resume line's (epoch, step) counts in)."""
    from sdlora_dist.checkpoint import load_run_config
    from sdlora_dist.data.classes import resolve_split, task_view
    from sdlora_dist.data.manifest import load_manifest
    from sdlora_dist.data.planning import train_steps_per_epoch

    cfg = load_run_config(run_dir)
    manifest = load_manifest(cfg.data.shards)
    view = task_view(manifest, resolve_split(manifest, cfg.data))
    steps = train_steps_per_epoch(view, 0, cfg.data.batch_size)
    return min(steps, cfg.train.max_steps_per_epoch or steps)


def stop_before_first_checkpoint(shards: Path, run_dir: Path) -> dict[str, Any]:
    """Ctrl-C during task 0 with the default checkpointing (no step checkpoints, 1800 s): the run is kept."""
    job = _train(shards, run_dir, "--set", "train.checkpoint_every=0")
    deadline = time.monotonic() + 300
    log = run_dir / "logs" / "rank_0.log"
    while time.monotonic() < deadline and not (log.is_file() and "task 0:" in log.read_text(errors="replace")):
        time.sleep(0.05)
    pids = [r["pid"] for r in _records(run_dir)]
    injected = time.monotonic()
    os.killpg(job.pid, signal.SIGINT)
    result = _finish(job, injected, pids)
    result["run_dir_kept"] = (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank_1.log").is_file()
    return {**result, **_resume(run_dir)}


def http_down_then_back(shards: Path, run_dir: Path) -> dict[str, Any]:
    """The shard server stops answering shard reads during task 0; it is back for --resume."""
    with http_server(shards.parent) as server:
        server.gone = True  # manifest.json answers, every shard GET is closed unanswered
        cmd = [*CLI, "train", "-b", "digits", "--data", f"{server.url}/{shards.name}", "--run-dir", str(run_dir),
               "--gpus-per-node", "2", *sets(*FAULT_RUN)]  # fmt: skip
        start = time.monotonic()
        job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
        result = _finish(job, start, [])
        result["run_dir_kept"] = (run_dir / "config.yaml").is_file()
        server.gone = False
        return {**result, **_resume(run_dir)}


def _s3_case(shards: Path, run_dir: Path, url: str, deny: bool) -> dict[str, Any]:
    from moto.core.authorization import enable_iam_authentication

    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with s3_server(shards, "bucket", "sets/digits") as endpoint:
        env = {**ENV, **creds, "AWS_ENDPOINT_URL": endpoint}
        cmd = [*CLI, "train", "-b", "digits", "--data", url, "--run-dir", str(run_dir), "--gpus-per-node", "2",
               *sets(*FAULT_RUN)]  # fmt: skip
        with enable_iam_authentication() if deny else contextlib.nullcontext():
            start = time.monotonic()
            job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # fmt: skip
            return _finish(job, start, [])


def s3_forbidden(shards: Path, run_dir: Path) -> dict[str, Any]:
    return _s3_case(shards, run_dir, "s3://bucket/sets/digits", deny=True)


def s3_no_such_bucket(shards: Path, run_dir: Path) -> dict[str, Any]:
    return _s3_case(shards, run_dir, "s3://no-such-bucket/sets/digits", deny=False)


def _entries(node: Any) -> list[dict]:
    """Every dict inside a manifest's JSON (its shard records among them)."""
    if isinstance(node, dict):
        return [node, *(e for v in node.values() for e in _entries(v))]
    if isinstance(node, list):
        return [e for v in node for e in _entries(v)]
    return []


def _damaged_copy(shards: Path, tmp: Path, damage) -> Path:
    copy = tmp / "shards"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(shards, copy)
    from sdlora_dist.data import load_manifest

    first = load_manifest(copy).task_shards("train", 0)[0].path  # task 0's first train shard, either layout
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = next(entry for entry in _entries(manifest) if entry.get("path") == first)
    damage(copy / shard["path"], shard)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _run_to_end(shards: Path, run_dir: Path) -> dict[str, Any]:
    job = _train(shards, run_dir)
    result = _finish(job, time.monotonic(), [])
    metrics = run_dir / "metrics.json"
    if metrics.exists():  # where a skipped sample is counted
        tasks = json.loads(metrics.read_text())["tasks"]
        result["corrupt_skipped"] = sum(t["train"]["corrupt_skipped"] for t in tasks)
    return result


def truncated_shard(shards: Path, run_dir: Path) -> dict[str, Any]:
    def truncate(path: Path, shard: dict) -> None:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    return _run_to_end(_damaged_copy(shards, run_dir.parent, truncate), run_dir)


def corrupt_image(shards: Path, run_dir: Path) -> dict[str, Any]:
    """One image's bytes garbled inside an intact tar, manifest updated: a bad source image, not a damaged file."""
    import tarfile

    from sdlora_dist.data.manifest import file_sha256

    def garble(path: Path, shard: dict) -> None:
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".jpeg", ".webp")))
        with open(path, "r+b") as f:
            f.seek(member.offset_data)
            f.write(b"\0not an image" * (member.size // 13))
        shard["sha256"] = file_sha256(path)

    return _run_to_end(_damaged_copy(shards, run_dir.parent, garble), run_dir)


def _tmpfs(run_dir: Path, size: str) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(run_dir)],
                          capture_output=True).returncode == 0  # fmt: skip


def full_disk(shards: Path, run_dir: Path) -> dict[str, Any]:
    if not _tmpfs(run_dir, "400k"):  # holds the run header and logs, not an engine checkpoint
        return {"not_measured": "mounting a tmpfs needs root"}
    try:
        return _run_to_end(shards, run_dir)
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)


def read_only_run_dir(shards: Path, run_dir: Path) -> dict[str, Any]:
    """A read-only bind mount over the running run directory: open files stay writable, every new file fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    if subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], capture_output=True).returncode:
        job.kill()
        return {"not_measured": "a bind mount needs root"}
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], check=True)
        result = _finish(job, time.monotonic(), pids)
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
    return {**result, **_resume(run_dir)}


def two_jobs(shards: Path, run_dir: Path) -> dict[str, Any]:
    job = _train(shards, run_dir)
    pids = _wait_training(run_dir, job)
    start = time.monotonic()
    second = subprocess.run([*CLI, "train", "--resume", str(run_dir), "--gpus-per-node", "2"], env=ENV,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.monotonic() - start
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    first = _finish(job, time.monotonic(), pids)
    return {
        "exit_code": second.returncode,
        "seconds_to_exit": round(seconds, 1),
        "last_line": lines[-1] if lines else "",
        "console_lines": len(lines),
        "traceback_on_console": "Traceback" in second.stderr,
        "first_job_exit_code": first["exit_code"],
    }


FAULTS = {
    "kill -9 of one rank": kill_rank,
    "kill -9 of the launcher (sdlora train)": kill_launcher,
    "kill -9 of the whole job": kill_whole_job,
    "SIGINT (Ctrl-C) to the job": sigint,
    "SIGTERM to sdlora train": sigterm,
    "truncated train shard": truncated_shard,
    "corrupt image in a shard": corrupt_image,
    "full disk (400 kB tmpfs run dir)": full_disk,
    "run dir turned read-only mid-run": read_only_run_dir,
    "second job on a running run (--resume)": two_jobs,
    "SIGTERM preemption (to every process of the job)": preemption,
    "Ctrl-C during task 0 with default checkpointing": stop_before_first_checkpoint,
    "HTTP shard server down in task 0, then back": http_down_then_back,
    "S3 403 (unknown access key, moto)": s3_forbidden,
    "S3 no such bucket (moto)": s3_no_such_bucket,
}


def markdown(results: list[dict[str, Any]]) -> str:
    """The fault table for RELIABILITY.md."""
    rows = ["| fault | exit code | s to exit | console: lines, last line | ranks left | resume after it |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "not_measured" in r or "harness_error" in r:
            rows.append(f"| {r['fault']} | not measured: {r.get('not_measured') or r.get('harness_error')} |||||")
            continue
        last = r["last_line"].replace("|", "\\|")
        resume = "n/a"
        if "resume_exit_code" in r:
            resume = f"exit {r['resume_exit_code']}; kept {len(r['tasks_kept'])} task(s); {r['resumed_from'] or '-'}"
            resume += f"; partial files: {len(r['partial_files_left'])}"
        if "steps_redone" in r:
            resume += f"; steps redone: {r['steps_redone']}"
        if "run_dir_kept" in r:
            resume = f"run dir kept: {'yes' if r['run_dir_kept'] else 'no'}; {resume}"
        seconds = r.get("seconds_until_no_rank", r["seconds_to_exit"])
        code = r["exit_code"] if r["exit_code"] >= 0 else f"{128 - r['exit_code']} (killed)"
        if "corrupt_skipped" in r:
            resume = f"{r['corrupt_skipped']} sample(s) skipped, counted in metrics.json"
        rows.append(f"| {r['fault']} | {code} | {seconds} | {r['console_lines']}: `{last}` | "
                    f"{r.get('ranks_alive_after_15s', '-')} | {resume} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fault_table.json"))
    parser.add_argument("--only", default="", help="comma-separated substrings of fault names")
    parser.add_argument("--markdown", type=Path, help="print the table of an existing JSON and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["faults"]))
        return
    from sdlora_dist.data import prepare

    work = Path(tempfile.mkdtemp(prefix="faults-"))
    shards = work / "digits"
    prepare("digits", None, shards, tasks=2, progress=False)
    wanted = [w for w in args.only.split(",") if w]
    results = []
    for i, (name, fault) in enumerate(FAULTS.items()):
        if wanted and not any(w in name for w in wanted):
            continue
        case = work / f"case{i}"
        case.mkdir()
        start = time.monotonic()
        try:
            row = fault(shards, case / "run")
        except Exception as exc:  # noqa: BLE001  (a fault the harness could not inject is reported, not hidden)
            row = {"harness_error": f"{type(exc).__name__}: {exc}"}
        row = {"fault": name, **row, "case_seconds": round(time.monotonic() - start, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    record = {"machine": machine, "config": [*TINY, *FAULT_RUN], "faults": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
