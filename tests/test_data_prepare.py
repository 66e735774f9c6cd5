"""Round trips: every supported source layout -> shards -> the same images back with the right global labels."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import DIGITS_SHARD_SIZE
from data_fixtures import (
    cifar_arrays,
    make_cifar,
    make_class_folders,
    make_cub,
    make_domainnet,
    make_image_folder,
    read_shard_set,
    save_image,
)
from PIL import Image

from sdlora_dist.data import add_task, inspect_table, load_manifest, prepare
from sdlora_dist.data.prepare import _open_stage, plan_class_shards, write_shards
from sdlora_dist.data.sources import read_source


def _check_round_trip(out: Path, root: Path | None, n_train: int, n_test: int, class_of: dict[str, str]) -> dict:
    """Manifest counts == source counts; each sample's label names its source class; bytes kept when not resized."""
    manifest = load_manifest(out)
    samples = read_shard_set(out)
    assert [len(samples["train"]), len(samples["test"])] == [n_train, n_test]
    for split in ("train", "test"):
        for t in range(manifest.num_tasks()):
            assert manifest.num_samples(split, t) == sum(1 for s in samples[split] if s["task"] == t)
        for s in samples[split]:
            assert s["label"] in manifest.task_labels(s["task"])
            assert manifest.class_names[s["label"]] == class_of[s["meta"]["path"]] == s["meta"]["class"]
            if root is not None:  # small sources are stored untouched
                assert s["image"] == (root / s["meta"]["path"]).read_bytes()
    paths = [s["meta"]["path"] for split in samples.values() for s in split]
    assert len(paths) == len(set(paths)), "a source image was written twice"
    return samples


@pytest.mark.parametrize("bench_name", ["imagenet-r", "imagenet-a"])
def test_class_folders_seeded_split(tmp_path: Path, bench_name: str) -> None:
    counts = {"n01": 5, "n02": 5, "n03": 5, "n04": 10}
    make_class_folders(tmp_path / "src", counts)
    prepare(bench_name, tmp_path / "src", tmp_path / "out", tasks=2, progress=False, workers=2, shard_size=3,
            subset=True)  # fmt: skip
    class_of = {f"{c}/img_{i:03d}.jpg": c for c, n in counts.items() for i in range(n)}
    samples = _check_round_trip(tmp_path / "out", tmp_path / "src", 20, 5, class_of)
    per_class_test = {c: sum(1 for s in samples["test"] if s["meta"]["class"] == c) for c in counts}
    assert per_class_test == {"n01": 1, "n02": 1, "n03": 1, "n04": 2}  # 80/20 within every class
    again = read_source(bench_name, tmp_path / "src", 0, subset=True)
    other = read_source(bench_name, tmp_path / "src", 1, subset=True)
    assert [i.path for i in again.test] == sorted(s["meta"]["path"] for s in samples["test"])
    assert [i.path for i in other.test] != [i.path for i in again.test]  # the split is seeded


def test_image_folder(tmp_path: Path) -> None:
    train, test = {"cat": 4, "dog": 3, "emu": 5}, {"cat": 2, "dog": 1, "emu": 1}
    make_image_folder(tmp_path / "src", train, test)
    prepare("imagefolder", tmp_path / "src", tmp_path / "out", tasks=3, seed=7, progress=False, workers=1)
    class_of = {f"{s}/{c}/{i:03d}.png": c for s, d in (("train", train), ("test", test)) for c, n in d.items()
                for i in range(n)}  # fmt: skip
    _check_round_trip(tmp_path / "out", tmp_path / "src", 12, 4, class_of)
    assert load_manifest(tmp_path / "out").classes_per_task == [1, 1, 1]


def test_cifar100_pickles_kept_at_32(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path / "src")
    prepare("cifar100", tmp_path / "src", tmp_path / "out", tasks=3, progress=False, workers=1, subset=True)
    manifest = load_manifest(tmp_path / "out")
    samples = read_shard_set(tmp_path / "out")
    for split, n in (("train", 18), ("test", 12)):
        arrays, labels = cifar_arrays(folder, split)
        assert len(samples[split]) == n
        for s in samples[split]:
            index = int(s["meta"]["path"].split("/")[1].split("_")[0])
            img = Image.open(io.BytesIO(s["image"]))
            assert img.size == (32, 32) and s["ext"] == "png"  # never upscaled, lossless
            np.testing.assert_array_equal(np.asarray(img), arrays[index])
            assert manifest.class_names[s["label"]] == f"cls{labels[index]:02d}"


def test_domainnet_lists(tmp_path: Path) -> None:
    counts = make_domainnet(tmp_path / "src")
    prepare("domainnet", tmp_path / "src", tmp_path / "out", tasks=2, progress=False, workers=1, subset=True)
    class_of = {}
    for split in ("train", "test"):
        for list_file in (tmp_path / "src").glob(f"*_{split}.txt"):
            for line in list_file.read_text().split("\n"):
                if line:
                    class_of[line.split()[0]] = line.split("/")[1]
    _check_round_trip(tmp_path / "out", tmp_path / "src", counts["train"], counts["test"], class_of)


def test_cub200_tree(tmp_path: Path) -> None:
    base, n_train, n_test = make_cub(tmp_path / "src")
    prepare("cub200", tmp_path / "src", tmp_path / "out", tasks=2, progress=False, workers=1, subset=True)
    class_of = {str(p.relative_to(base)): p.parent.name for p in (base / "images").rglob("*.jpg")}
    _check_round_trip(tmp_path / "out", base, n_train, n_test, class_of)


def test_digits_native_8x8(digits_shards: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest = load_manifest(digits_shards)
    samples = read_shard_set(digits_shards)
    assert len(samples["train"]) + len(samples["test"]) == len(digits.target) == 1797
    assert manifest.num_tasks() == 5 and manifest.seed == 1993
    expected = np.clip(np.rint(digits.images * 255 / 16), 0, 255).astype(np.uint8)
    for s in samples["train"] + samples["test"]:
        index = int(s["meta"]["path"].split("/")[1])
        img = Image.open(io.BytesIO(s["image"]))
        assert img.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(img), expected[index])
        assert manifest.class_names[s["label"]] == str(digits.target[index])
        assert s["label"] in manifest.task_labels(s["task"])
    # the reference code's order: np.random.seed(seed); np.random.permutation(n)
    assert manifest.class_order == np.random.RandomState(1993).permutation(10).tolist()


def test_class_order_reproducible_and_seeded(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {c: 2 for c in "abcdefgh"}, {c: 1 for c in "abcdefgh"})
    names = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare("imagefolder", tmp_path / "src", tmp_path / run, tasks=4, seed=seed, progress=False, workers=1)
        names[run] = load_manifest(tmp_path / run)
    assert names["a"].class_names == names["b"].class_names and names["a"].shards == names["b"].shards
    assert names["a"].class_names != names["c"].class_names
    assert names["a"].class_names == [sorted("abcdefgh")[i] for i in np.random.RandomState(3).permutation(8)]


def test_large_images_downscaled_small_kept(tmp_path: Path) -> None:
    save_image(tmp_path / "src/train/a/big.jpg", 0, 0, size=(600, 400))
    save_image(tmp_path / "src/train/b/small.png", 1, 0, size=(30, 20))
    save_image(tmp_path / "src/test/a/t.jpg", 0, 1, size=(40, 300))
    save_image(tmp_path / "src/test/b/t.png", 1, 1, size=(64, 64))  # every class needs a test image
    prepare("imagefolder", tmp_path / "src", tmp_path / "out", tasks=1, resize=64, progress=False, workers=1)
    samples = read_shard_set(tmp_path / "out")
    sizes = {s["meta"]["path"]: Image.open(io.BytesIO(s["image"])).size for v in samples.values() for s in v}
    assert sizes == {"train/a/big.jpg": (96, 64), "train/b/small.png": (30, 20), "test/a/t.jpg": (40, 300),
                     "test/b/t.png": (64, 64)}  # fmt: skip


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"x": 3, "y": 3}, {"x": 1, "y": 1})
    prepare("imagefolder", tmp_path / "src", tmp_path / "out", tasks=2, progress=False, workers=1)
    manifest = load_manifest(tmp_path / "out")
    urls = [str(tmp_path / "out" / s.path) for t in range(2) for s in manifest.task_shards("train", t)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png", "cls", "json")
    rows = list(ds)
    assert len(rows) == 6
    for img, label, meta in rows:
        assert img.size == (20, 16) and label == meta["label"] and manifest.class_names[label] == meta["class"]


def test_resume_reuses_finished_shards(tmp_path: Path, digits_shards: Path) -> None:
    """An interrupted prepare (some shards done, one half-written temp) resumes and ends byte-identical."""
    out = tmp_path / "out"
    stage = tmp_path / "out.partial"
    fresh = load_manifest(digits_shards)
    source = read_source("digits", None, 0)
    plans = plan_class_shards(source, DIGITS_SHARD_SIZE)
    _open_stage(stage, fresh.fingerprint)  # what the interrupted run had done: stage, 3 shards, one partial temp
    write_shards(plans[:3], stage, resize=256, workers=1, progress=False, desc="")
    half = stage / (plans[3].path + ".tmp")
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"half a tar")
    done_mtime = {p.path: os.stat(stage / p.path).st_mtime_ns for p in plans[:3]}
    assert not out.exists()  # nothing at --out while interrupted
    manifest = prepare("digits", None, out, shard_size=DIGITS_SHARD_SIZE, progress=False, workers=1)
    assert not stage.exists() and not list(out.rglob("*.tmp")) and not list(out.rglob(".*.done.json"))
    assert {p: os.stat(out / p).st_mtime_ns for p in done_mtime} == done_mtime  # not rewritten
    assert manifest.to_json() == fresh.to_json()
    assert inspect_table(out, verify=True).startswith(f"verified {len(plans)} shards")
    again = prepare("digits", None, out, shard_size=DIGITS_SHARD_SIZE, progress=False)
    assert again.to_json() == fresh.to_json()  # no-op


def test_add_task_appends_new_classes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2, "d": 2}, {"a": 1, "b": 1, "c": 1, "d": 1})
    make_image_folder(tmp_path / "new", {"p": 3, "q": 2}, {"p": 1, "q": 2})
    prepare("imagefolder", tmp_path / "src", tmp_path / "out", tasks=2, progress=False, workers=1)
    before = load_manifest(tmp_path / "out")
    assert add_task(tmp_path / "out", tmp_path / "new", progress=False, workers=1) == 2
    manifest = load_manifest(tmp_path / "out")
    assert manifest.class_names[:4] == before.class_names and sorted(manifest.class_names[4:]) == ["p", "q"]
    assert manifest.classes_per_task == [2, 2, 2] and manifest.class_offset(2) == 4
    assert manifest.num_samples("train", 2) == 5 and manifest.num_samples("test", 2) == 3
    samples = read_shard_set(tmp_path / "out")
    for s in samples["train"] + samples["test"]:
        if s["task"] == 2:
            assert s["label"] in (4, 5) and manifest.class_names[s["label"]] == s["meta"]["path"].split("/")[1]
    assert manifest.shards["train"][:2] == before.shards["train"][:2]
    assert "verified" in inspect_table(tmp_path / "out", verify=True)
    assert not list((tmp_path / "out").glob(".add-task*"))


def test_tar_headers_are_fixed(digits_shards: Path) -> None:
    manifest = load_manifest(digits_shards)
    with tarfile.open(digits_shards / manifest.task_shards("train", 0)[0].path) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.mode) for m in members} == {(0, 0, 0o644)}
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["png", "cls", "json"]
