"""Faults at prepare time, through the real CLI: Ctrl-C with worker processes, a damaged shard set, bad layouts.

Each test pins a failure seen in issue 10 and fails without its fix.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import CLI, error_line, run_main
from data_fixtures import make_class_folders, make_cub, make_domainnet, make_image_folder, make_imagenet_r
from PIL import Image

from sdlora_dist.data import load_manifest


def _big_folder(root: Path, n_classes: int = 4, per_class: int = 60) -> None:
    """Smooth 900x700 PNGs: cheap to write, slow enough to decode, resize and re-encode that prepare takes a while."""
    y, x = np.mgrid[0:700, 0:900]
    for c in range(n_classes):
        for i in range(per_class):
            split, index = ("test", i) if i % 5 == 0 else ("train", i)
            pixels = np.stack([(x + 7 * i) % 256, (y + 11 * c) % 256, (x + y + i) % 256], axis=2).astype(np.uint8)
            path = root / split / f"c{c}" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, compress_level=1)


def _live(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ctrl_c_with_workers_exits_130_at_once_and_resumes(tmp_path: Path) -> None:
    _big_folder(tmp_path / "src")
    out, stage = tmp_path / "out", tmp_path / "out.partial"
    argv = [*CLI, "data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"), "--out", str(out),
            "--tasks", "2", "--workers", "2", "--shard-size", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own process group, like a shell's foreground job: Ctrl-C reaches the main process and every worker
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(stage.rglob(".*.done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted: make the source bigger"
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("data prepare still running 5 s after Ctrl-C")
    elapsed = time.monotonic() - sent
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and elapsed < 5, (proc.returncode, elapsed, err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: data prepare stopped"), err
    assert "Traceback" not in err and "ForkPoolWorker" not in err
    time.sleep(0.5)
    assert not _live(proc.pid), "a worker process outlived the command"
    assert not out.exists() and stage.is_dir()  # nothing half-finished at --out; the stage is kept for resuming

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "resuming the interrupted prepare" in again.stderr, again.stderr
    check = subprocess.run([*CLI, "data", "inspect", str(out), "--verify"], capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "verified" in check.stdout, check.stderr
    assert sum(load_manifest(out).num_samples("train", t) for t in range(2)) == 4 * 48


# --------------------------------------------------------------------------------------------------------------------
# a damaged shard set: the printed advice, followed literally, repairs it


def _advised_command(err: str) -> list[str]:
    line = error_line(err)
    match = re.search(r"rewrite them with: (sdlora data prepare .*)$", line)
    assert match, line
    return shlex.split(match.group(1))


def test_damaged_shards_rewritten_by_the_advised_command(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"a": 3, "b": 3, "c": 3}, {"a": 1, "b": 1, "c": 1})
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"),
                      "--out", str(out), "--tasks", "3", "--workers", "1")  # fmt: skip
    assert rc == 0, err
    pristine = {p: p_bytes for p, p_bytes in ((p, (out / p).read_bytes()) for p in _shard_paths(out))}
    manifest_before = (out / "manifest.json").read_bytes()
    truncated, deleted = sorted(pristine)[0], sorted(pristine)[-1]
    (out / truncated).write_bytes(pristine[truncated][:700])
    (out / deleted).unlink()

    rc, _, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    assert rc == 2 and "2 shard(s)" in error_line(err)
    argv = _advised_command(err)
    assert argv[:3] == ["sdlora", "data", "prepare"] and argv[argv.index("--out") + 1] == str(out)
    rc, _, err = run_main(capsys, *argv[1:])  # exactly what the message says (before: "nothing to do")
    assert rc == 0 and "rewrote 2 damaged or missing shard(s)" in err, err
    rc, text, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    assert rc == 0 and "verified 6 shards" in text, err
    assert {p: (out / p).read_bytes() for p in pristine} == pristine  # byte-identical to the first prepare
    assert (out / "manifest.json").read_bytes() == manifest_before
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.done.json"))
    rc, _, err = run_main(capsys, *argv[1:])
    assert rc == 0 and "shards verify: nothing to do" in err


def _shard_paths(out: Path) -> list[str]:
    manifest = load_manifest(out)
    return [s.path for split in manifest.shards.values() for task in split for s in task]


def test_digits_advice_has_no_root(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "d"
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(out), "--tasks", "2",
                      "--seed", "7", "--workers", "1")  # fmt: skip
    assert rc == 0, err
    shard = _shard_paths(out)[1]
    (out / shard).write_bytes((out / shard).read_bytes()[:-512])
    rc, _, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    argv = _advised_command(err)
    assert "--root" not in argv and argv[argv.index("--seed") + 1] == "7"
    rc, _, err = run_main(capsys, *argv[1:])
    assert rc == 0, err
    rc, _, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    assert rc == 0, err


# --------------------------------------------------------------------------------------------------------------------
# bad layouts and missing data at prepare time


def _prepare_fails(capsys: pytest.CaptureFixture, out: Path, *argv: str) -> str:
    rc, _, err = run_main(capsys, "data", "prepare", "--out", str(out), "--workers", "1", *argv)
    assert rc == 2, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return error_line(err)


@pytest.mark.slow  # prepares a 200-class source: over 2 s
def test_imagenet_r_root_one_level_too_high(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    wnids = make_imagenet_r(tmp_path / "data" / "imagenet-r")
    # the folder that holds imagenet-r/: found one level down, all 200 classes
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "imagenet-r", "--root", str(tmp_path / "data"),
                      "--out", str(tmp_path / "out"), "--workers", "1")  # fmt: skip
    assert rc == 0, err
    assert sorted(load_manifest(tmp_path / "out").class_names) == wnids
    # another folder name: refused naming the folder to pass, even with the old advice --tasks 1
    (tmp_path / "data" / "imagenet-r").rename(tmp_path / "data" / "imagenet-r-2021")
    for extra in ([], ["--tasks", "1"], ["--tasks", "1", "--subset"]):
        line = _prepare_fails(capsys, tmp_path / "o2", "--benchmark", "imagenet-r", "--root", str(tmp_path / "data"),
                              *extra)  # fmt: skip
        assert f"one level too high; pass --root {tmp_path / 'data' / 'imagenet-r-2021'}" in line


def test_fewer_classes_than_the_benchmark_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_imagenet_r(tmp_path / "imagenet-a", n_classes=199, per_class=2)
    line = _prepare_fails(
        capsys, tmp_path / "out", "--benchmark", "imagenet-a", "--root", str(tmp_path / "imagenet-a")
    )
    assert "found 199 classes" in line and "the benchmark has 200" in line and "--subset" in line


@pytest.mark.parametrize("domain", ["quickdraw", "clipart"])  # clipart: the first listed, once taken for a bad root
def test_domainnet_missing_domain_counted_per_domain(
    capsys: pytest.CaptureFixture, tmp_path: Path, domain: str
) -> None:
    counts = make_domainnet(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / domain)
    args = ("--benchmark", "domainnet", "--root", str(tmp_path / "src"), "--tasks", "2", "--subset")
    line = _prepare_fails(capsys, tmp_path / "out", *args)
    assert f"8 listed image(s) are missing ({domain}: 8)" in line and "--max-missing 0" in line
    line = _prepare_fails(capsys, tmp_path / "out", *args, "--max-missing", "7")
    assert "pass --max-missing 8 to prepare without them" in line
    rc, _, err = run_main(capsys, "data", "prepare", "--out", str(tmp_path / "out"), "--workers", "1", *args,
                      "--max-missing", "8")  # fmt: skip
    assert rc == 0, err
    manifest = load_manifest(tmp_path / "out")
    assert manifest.missing == 8 and manifest.prepare_args["max_missing"] == 8
    assert sorted(s["path"].split("/")[0] for s in manifest.skipped) == [domain] * 8
    n = sum(manifest.num_samples(sp, t) for sp in ("train", "test") for t in range(2))
    assert n == counts["train"] + counts["test"] - 8
    rc, text, _ = run_main(capsys, "data", "inspect", str(tmp_path / "out"))
    assert "8 listed source image(s) were missing" in text


def test_cub_class_without_images_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    base, _, _ = make_cub(tmp_path / "src")
    shutil.rmtree(base / "images" / "004.Bird_3")
    args = ("--benchmark", "cub200", "--root", str(tmp_path / "src"), "--tasks", "2", "--subset")
    line = _prepare_fails(capsys, tmp_path / "out", *args)
    assert "3 listed image(s) are missing (004.Bird_3: 3)" in line
    line = _prepare_fails(capsys, tmp_path / "out", *args, "--max-missing", "3")
    assert "1 class(es) have no train or no test image: 004.Bird_3 (0 train, 0 test)" in line


def test_class_without_test_image_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"a": 2, "b": 2}, {"a": 1})
    line = _prepare_fails(capsys, tmp_path / "out", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"),
                          "--tasks", "1")  # fmt: skip
    assert "b (2 train, 0 test)" in line


def test_class_emptied_by_corrupt_images_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"a": 2, "b": 2}, {"a": 1, "b": 1})
    (tmp_path / "src" / "test" / "b" / "000.png").write_bytes(b"\x89PNG broken")
    line = _prepare_fails(capsys, tmp_path / "out", "--benchmark", "imagefolder", "--root", str(tmp_path / "src"),
                          "--tasks", "1")  # fmt: skip
    assert "b (2 train, 0 test)" in line


def test_non_images_counted_and_reasons_readable(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_class_folders(tmp_path / "src", {"n1": 5, "n2": 5})
    (tmp_path / "src" / "n1" / "notes.txt").write_text("where these came from")
    (tmp_path / "src" / "n2" / "img_003.jpg").write_bytes(b"not an image at all")
    rc, text, err = run_main(capsys, "data", "prepare", "--benchmark", "imagenet-r", "--root", str(tmp_path / "src"),
                         "--out", str(tmp_path / "out"), "--tasks", "2", "--workers", "2", "--subset")  # fmt: skip
    assert rc == 0, err
    skipped = {s["path"]: s["reason"] for s in load_manifest(tmp_path / "out").skipped}
    assert skipped == {"n1/notes.txt": "not an image file (.txt)",
                       "n2/img_003.jpg": "corrupt image: not a recognised image format"}  # fmt: skip
    assert "2 unreadable source images skipped" in text and "skipped 2" in err
    assert "object at 0x" not in err + text
