"""Bad input through the CLI: one ``error:`` line, exit code 2, nothing half-written left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_helpers import error_line, run_main
from data_fixtures import dir_listing, make_class_folders, make_image_folder

from sdlora_dist.data import load_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "src", {"a": 3, "b": 3, "c": 3}, {"a": 1, "b": 1, "c": 1})
    return tmp_path / "src"


def _prepare(capsys: pytest.CaptureFixture, root: Path, out: Path, *extra: str) -> None:
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "imagefolder", "--root", str(root),
                          "--out", str(out), "--tasks", "3", "--workers", "1", *extra)  # fmt: skip
    assert rc == 0, err


def test_prepare_inspect_ok(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    _prepare(capsys, folder, tmp_path / "out")
    rc, out, _ = run_main(capsys, "data", "inspect", str(tmp_path / "out"), "--verify")
    assert rc == 0 and "verified 6 shards" in out and "imagefolder: 3 classes, 3 tasks" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmark", "imagefolder", "--root", "{tmp}/nope"], r"--root .*nope does not exist"),
        (["--benchmark", "imagenet-x", "--root", "{src}"], r"unknown benchmark 'imagenet-x': valid benchmarks are"),
        (["--benchmark", "cifar100", "--root", "{src}"], r"cifar100: .* does not hold the CIFAR-100 python pickles"),
        (["--benchmark", "domainnet", "--root", "{src}"], r"domainnet: .* lacks the official split lists"),
        (["--benchmark", "cub200", "--root", "{src}"], r"cub200: .* lacks images.txt"),
        (["--benchmark", "imagenet-r", "--root", "{src}/train/a"], r"imagenet-r: .* holds no class folders"),
        (["--benchmark", "imagefolder", "--root", "{src}/train"], r"does not hold train/ and test/ folders"),
        (["--benchmark", "imagefolder", "--root", "{src}", "--tasks", "4"], r"--tasks 4 is more than the 3 classes"),
        (["--benchmark", "digits", "--root", "{src}"], r"bundled with scikit-learn: do not pass --root"),
        (["--benchmark", "imagefolder", "--root", "{src}"], r"has no default task count: pass --tasks"),
    ],
)
def test_prepare_bad_input(
    capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path, argv: list, message: str
) -> None:
    out = tmp_path / "shards"
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{src}", str(folder)) for a in argv]
    rc, _, err = run_main(capsys, "data", "prepare", "--out", str(out), "--workers", "1", *argv)
    assert rc == 2
    assert re.search(message, error_line(err)), err
    assert not out.exists() and not (tmp_path / "shards.partial").exists()


def test_corrupt_source_image_skipped_and_reported(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    make_class_folders(tmp_path / "src", {"n1": 5, "n2": 5})
    (tmp_path / "src" / "n2" / "img_002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rc, out, err = run_main(capsys, "data", "prepare", "--benchmark", "imagenet-a", "--root", str(tmp_path / "src"),
                        "--out", str(tmp_path / "out"), "--tasks", "2", "--workers", "2", "--subset")  # fmt: skip
    assert rc == 0, err
    assert "skipped 1 unreadable source image(s)" in err and "n2/img_002.jpg (corrupt image" in err
    assert "1 unreadable source images skipped" in out
    manifest = load_manifest(tmp_path / "out")
    assert [s["path"] for s in manifest.skipped] == ["n2/img_002.jpg"]
    total = sum(manifest.num_samples(sp, t) for sp in ("train", "test") for t in range(2))
    assert total == 9


def test_out_holding_another_dataset_refused(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(out), "--tasks", "2")
    assert rc == 0, err
    before = {p: (out / p).read_bytes() for p in dir_listing(out) if (out / p).is_file()}
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "imagefolder", "--root", str(folder), "--out",
                      str(out), "--tasks", "3")  # fmt: skip
    assert rc == 2 and "already holds a different shard set (benchmark 'digits'" in error_line(err)
    assert {p: (out / p).read_bytes() for p in dir_listing(out) if (out / p).is_file()} == before
    assert not (tmp_path / "out.partial").exists()
    # the same input again is a no-op, a different seed is a different dataset
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(out), "--tasks", "2")
    assert rc == 0 and "nothing to do" in err
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(out), "--tasks", "2",
                      "--seed", "9")  # fmt: skip
    assert rc == 2 and "different shard set" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    rc, _, err = run_main(capsys, "data", "prepare", "--benchmark", "digits", "--out", str(tmp_path / "junk"))
    assert rc == 2 and "non-empty folder without manifest.json" in error_line(err)
    assert dir_listing(tmp_path / "junk") == ["notes.txt"]


def test_truncated_and_altered_shards_fail_verify(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _prepare(capsys, folder, out)
    manifest = load_manifest(out)
    altered, truncated = manifest.task_shards("train", 0)[0], manifest.task_shards("test", 2)[0]
    data = bytearray((out / altered.path).read_bytes())
    data[600] ^= 0xFF  # inside the first image: same size, different bytes
    (out / altered.path).write_bytes(bytes(data))
    rc, _, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    assert rc == 2 and f"{altered.path} (sha256 mismatch)" in error_line(err)
    (out / truncated.path).write_bytes((out / truncated.path).read_bytes()[:1000])
    rc, _, err = run_main(capsys, "data", "inspect", str(out), "--verify")
    line = error_line(err)
    assert rc == 2 and "2 shard(s)" in line and f"{truncated.path} (truncated or altered: 1000 bytes" in line
    rc, out_text, _ = run_main(capsys, "data", "inspect", str(out))  # without --verify: the table only
    assert rc == 0 and "task" in out_text


def test_corrupt_or_missing_manifest(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    rc, _, err = run_main(capsys, "data", "inspect", str(tmp_path))
    assert rc == 2 and "no manifest.json in" in error_line(err)
    _prepare(capsys, folder, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del raw["classes_per_task"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(raw))
    rc, _, err = run_main(capsys, "data", "inspect", str(tmp_path / "out"))
    assert rc == 2 and "manifest.json is corrupt" in error_line(err)


def test_add_task_cli(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _prepare(capsys, folder, out)
    before, folders = (out / "manifest.json").read_bytes(), sorted((out / "train").iterdir())
    rc, _, err = run_main(capsys, "data", "add-task", "--out", str(out), "--root", str(folder), "--workers", "1")
    assert rc == 2 and "classes already in" in error_line(err)
    assert (out / "manifest.json").read_bytes() == before and sorted((out / "train").iterdir()) == folders
    assert not [p for p in dir_listing(out) if "partial" in p]
    make_image_folder(tmp_path / "new", {"z": 2}, {"z": 1})
    rc, text, err = run_main(capsys, "data", "add-task", "--out", str(out), "--root", str(tmp_path / "new"))
    assert rc == 0 and "added task 3" in text, err
    rc, _, err = run_main(
        capsys, "data", "add-task", "--out", str(tmp_path / "nowhere"), "--root", str(tmp_path / "new")
    )
    assert rc == 2 and "no manifest.json" in error_line(err)
