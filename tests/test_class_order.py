"""Class order and task split chosen at train time over one class-grouped shard set (issue 12), and the run's split
fingerprint that --resume / --continue check before writing anything (issue 10, item 1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import metrics, sdlora, sets
from data_fixtures import make_class_folders, read_shard_set

from sdlora_dist.data import TransformSpec, load_manifest, make_eval_loader, prepare
from sdlora_dist.data.classes import resolve_split, seeded_order, task_view
from sdlora_dist.errors import UserError

SPEC = TransformSpec(img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
IR_CLASSES = 20
# a tiny random ViT for the recipes' ViT-B (shapes only: the numbers say nothing, the task counts do)
IR_TINY = ["model.name=vit_tiny_patch16_224", "model.weights=random", "data.normalize=half",
           "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1", "train.checkpoint_every=0",
           "data.batch_size=8", "data.eval_batch_size=64", "train.timeout_s=60", "adapter.rank=2",
           "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"]  # fmt: skip


def split_of(**kw) -> SimpleNamespace:
    """The four data.* split settings (None unless given)."""
    return SimpleNamespace(**{"class_order_seed": None, "class_order": None, "tasks": None, "classes_per_task": None,
                              **kw})  # fmt: skip


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def ir_shards(tmp_path_factory) -> Path:
    """An imagenet-r-style class-folder fixture with 20 classes (5 images each: 4 train, 1 test), prepared once."""
    root = tmp_path_factory.mktemp("ir")
    make_class_folders(root / "src", {f"n{c:08d}": 5 for c in range(IR_CLASSES)}, size=(24, 20))
    prepare("imagenet-r", root / "src", root / "shards", progress=False, workers=1, subset=True)
    return root / "shards"


@pytest.mark.parametrize("seed", [0, 1, 7, 1993, 1995, 2**31 + 5])
def test_seeded_order_is_the_authors_rule(seed):
    for n in (10, 100, 200, 345):
        np.random.seed(seed)
        assert seeded_order(n, seed) == np.random.permutation(n).tolist()


def test_class_order_seeds_and_splits_on_one_shard_set(ir_shards):
    manifest = load_manifest(ir_shards)
    assert manifest.format == 2 and manifest.stored_names == [f"n{c:08d}" for c in range(IR_CLASSES)]
    assert manifest.class_order == seeded_order(IR_CLASSES, 1995)  # imagenet-r's default seed, as before
    orders = {}
    for seed in (1, 2):
        split = resolve_split(manifest, split_of(class_order_seed=seed, tasks=5))
        assert split.class_order == seeded_order(IR_CLASSES, seed) and split.classes_per_task == [4] * 5
        orders[seed] = split.record(manifest.stored_names)
    assert orders[1]["class_order"] != orders[2]["class_order"]
    assert orders[1]["fingerprint"] != orders[2]["fingerprint"]
    explicit = resolve_split(manifest, split_of(class_order=list(range(19, -1, -1)), classes_per_task=[2, 8, 10]))
    assert explicit.task_classes(0) == [19, 18] and explicit.classes_per_task == [2, 8, 10]
    assert explicit.record(manifest.stored_names)["class_order_from"] == "explicit"
    bad_cases = ((split_of(class_order=[0, 0, *range(2, 20)]), "exactly once"),
                 (split_of(classes_per_task=[10, 9]), "sum to the 20"), (split_of(tasks=21), "more than"))  # fmt: skip
    for bad, expected in bad_cases:
        with pytest.raises(UserError, match=expected):
            resolve_split(manifest, bad)


@pytest.mark.parametrize("tasks", [5, 20])
def test_a_task_reads_only_its_classes_shards(ir_shards, tasks):
    manifest = load_manifest(ir_shards)
    split = resolve_split(manifest, split_of(class_order_seed=3, tasks=tasks))
    view = task_view(manifest, split)
    assert view.num_tasks() == tasks
    for t in range(tasks):
        classes = split.task_classes(t)
        for s in ("train", "test"):  # exactly the shards of the task's classes, nothing else
            assert {sh.path.split("/")[1] for sh in view.task_shards(s, t)} == {f"class_{c:04d}" for c in classes}
        loader = make_eval_loader(ir_shards, [t], spec=SPEC, batch_size=64, with_keys=True, manifest=view)
        labels, keys = [], []
        for _, y, k in loader:
            labels += y.tolist()
            keys += k
        stored = [int(k.split("-c")[1][:4]) for k in keys]  # test-c0007-0000000: the sample's stored class
        assert sorted(stored) == sorted(classes) and labels == [view.label_map[c] for c in stored]
        assert set(labels) == set(view.task_labels(t))


@pytest.mark.slow
def test_two_seeds_record_two_orders_and_report_the_split(digits_shards, tmp_path):
    runs = {}
    for seed in (1, 2):
        run = tmp_path / f"seed{seed}"
        res = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run),
                     *sets("train.tasks=1", f"data.class_order_seed={seed}"))  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        runs[seed] = json.loads((run / "run.json").read_text())
        split = runs[seed]["task_split"]
        assert split["class_order"] == seeded_order(10, seed) and split["class_order_seed"] == seed
        assert runs[seed]["class_names"] == [str(c) for c in seeded_order(10, seed)]
        assert metrics(run)["accuracy"]["totals"][0] == sum(
            1 for s in read_shard_set(digits_shards)["test"] if s["stored"] in split["class_order"][:2]
        )
    assert runs[1]["task_split"]["fingerprint"] != runs[2]["task_split"]["fingerprint"]
    report = sdlora("report", str(tmp_path / "seed1"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "seed1" / "report" / "report.md").read_text()
    assert "- task split: 5 tasks, 2 classes each; class order: seed 1" in text


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "tasks"), [("imagenet-r-5", 5), ("imagenet-r-20", 20)])
def test_recipes_apply_their_split_at_train_time(ir_shards, tmp_path, recipe, tasks):
    run = tmp_path / recipe
    args = [a for s in IR_TINY for a in ("--set", s)]
    res = sdlora("train", "-b", recipe, "--data", str(ir_shards), "--run-dir", str(run), *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["task_split"]["classes_per_task"] == [IR_CLASSES // tasks] * tasks
    assert len(metrics(run)["accuracy"]["matrix"]) == tasks
    assert sdlora("report", str(run)).returncode == 0
    assert f"- task split: {tasks} tasks, {IR_CLASSES // tasks} classes each" in (run / "report/report.md").read_text()


@pytest.mark.slow
def test_changed_class_order_is_refused_before_anything_is_written(tmp_path):
    """Issue 10 case 1: shards re-prepared in place with another order, then --continue / --resume of the run."""
    shards, run = tmp_path / "d", tmp_path / "run"
    prepare("digits", None, shards, progress=False, workers=1)
    res = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run), *sets("train.tasks=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.rmtree(shards)
    prepare("digits", None, shards, progress=False, workers=1, seed=7)
    before = tree_hashes(run)
    for flag in ("--continue", "--resume"):
        res = sdlora("train", flag, str(run))
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
        assert f"{flag} {run}: the shards at {shards} no longer give the class order" in res.stderr
        assert "task 0 classes changed" in res.stderr
        assert tree_hashes(run) == before  # byte-identical: nothing was written
    older = tmp_path / "older"  # a run from before the split was recorded: compared by its class names
    shutil.copytree(run, older)
    info = json.loads((older / "run.json").read_text())
    del info["task_split"]
    (older / "run.json").write_text(json.dumps(info))
    (older / "config.yaml").write_text((older / "config.yaml").read_text().replace(str(run), str(older)))
    before = tree_hashes(older)
    res = sdlora("train", "--continue", str(older))
    assert res.returncode == 2 and "class names by label" in res.stderr and tree_hashes(older) == before


def test_authors_train_crop_is_bilinear_when_asked():
    """data.train_interpolation=bilinear resizes the train crop as torchvision's RandomResizedCrop default does."""
    import random

    from PIL import Image

    from sdlora_dist.config import load_config
    from sdlora_dist.data.transforms import crop_box, train_crop
    from sdlora_dist.preprocess import transform_spec

    cfg = load_config(overrides=["data.train_interpolation=bilinear", "data.normalize=none", "data.hflip=0"])
    model = SimpleNamespace(pretrained_cfg={"input_size": (3, 16, 16), "interpolation": "bicubic"},
                            backbone=SimpleNamespace())  # fmt: skip
    spec = transform_spec(model, cfg.data)
    assert spec.train_interpolation == "bilinear" and spec.interpolation == "bicubic" and spec.mean == (0.0,) * 3
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 52, 3), dtype=np.uint8))
    box = crop_box(52, 40, spec.train_scale, random.Random(5))
    got = np.asarray(train_crop(img, spec, random.Random(5)))
    assert np.array_equal(got, np.asarray(img.resize((16, 16), Image.BILINEAR, box=box)))
    assert not np.array_equal(got, np.asarray(img.resize((16, 16), Image.BICUBIC, box=box)))
    with pytest.raises(UserError, match="data.train_interpolation: must be one of"):
        load_config(overrides=["data.train_interpolation=cubic"])

