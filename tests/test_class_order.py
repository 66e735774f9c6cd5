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
from cli_helpers import TINY, metrics, sdlora, sets
from data_fixtures import make_class_folders, read_shard_set

from sdlora_dist.data import load_manifest, make_eval_loader, prepare
from sdlora_dist.data.classes import resolve_split, seeded_order, task_view
from sdlora_dist.data.pipeline import TransformSpec
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


@pytest.fixture(scope="module")
def digits_format1(tmp_path_factory) -> Path:
    """digits prepared with the defaults in one folder per task (format 1, the layout of earlier versions)."""
    out = tmp_path_factory.mktemp("digits") / "task"
    prepare("digits", None, out, progress=False, workers=1, layout="task")
    return out


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


@pytest.mark.slow  # prepares a second digits set and evaluates both: over 2 s
def test_default_reproduces_todays_order_and_evaluation(digits_shards, digits_format1):
    """The default view of a class-grouped set is the format-1 set's order, split and test sets, sample for sample.

    So a model scores the same on both (evaluation reads each test sample once; the counts are compared exactly).
    Training batches differ: a format-1 shard mixed a task's classes at prepare time, the class-grouped set mixes
    them at train time.
    """
    import torch

    from sdlora_dist.config import load_config
    from sdlora_dist.model import build_model

    both = (digits_shards, digits_format1)
    grouped, tasked = (load_manifest(p) for p in both)
    view = task_view(grouped, resolve_split(grouped, split_of()))
    old = task_view(tasked, resolve_split(tasked, split_of(tasks=5)))  # a recipe's data.tasks equal to the set's
    assert tasked.format == 1 and view.class_names == old.class_names == [str(c) for c in seeded_order(10, 1993)]
    assert view.classes_per_task == old.classes_per_task == [2] * 5
    by_path = [{s["meta"]["path"]: s["label"] for s in read_shard_set(p)["test"]} for p in both]
    assert by_path[0] == by_path[1]  # every test image under the same global label
    torch.manual_seed(0)
    cfg = load_config(overrides=[*TINY, "model.weights=random", "model.name=vit_tiny_patch16_224"])
    model = build_model(cfg)
    for t in range(5):
        if t:
            model.consolidate()
        model.add_task(2)
    model.eval()
    counts = []
    for path, manifest in zip(both, (view, old), strict=True):
        correct = [0] * 5
        for x, y in make_eval_loader(path, list(range(5)), spec=SPEC, batch_size=64, manifest=manifest):
            with torch.no_grad():
                hit = model(x).argmax(1) == y
            for t in range(5):
                correct[t] += int(hit[(y // 2) == t].sum())
        counts.append(correct)
    assert counts[0] == counts[1] and sum(counts[0]) > 0


def test_format1_set_refuses_another_order_in_one_line(digits_format1, tmp_path):
    from cli_helpers import cli

    code, _, err = cli("train", "-b", "digits", "--data", str(digits_format1), "--run-dir", str(tmp_path / "r"),
                       "--set", "data.class_order_seed=7", "--dry-run")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "data.class_order_seed=7" in err and "re-prepare" in err
    assert not (tmp_path / "r").exists()
    code, out, err = cli("train", "-b", "digits", "--data", str(digits_format1), "--run-dir", str(tmp_path / "r"),
                         "--dry-run")  # fmt: skip
    assert code == 0, err  # the recipe's data.tasks: 5 is the set's own split


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
@pytest.mark.parametrize("layout", ["task", "class"])
def test_changed_class_order_is_refused_before_anything_is_written(tmp_path, layout):
    """Issue 10 case 1: shards re-prepared in place with another order, then --continue / --resume of the run."""
    shards, run = tmp_path / "d", tmp_path / "run"
    prepare("digits", None, shards, progress=False, workers=1, layout=layout)
    res = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run), *sets("train.tasks=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.rmtree(shards)
    prepare("digits", None, shards, progress=False, workers=1, seed=7, layout=layout)
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


# correct counts per task group of the TINY digits run (train.max_steps_per_epoch=6), recorded with main's code before
# class-grouped shards (commit f80f219, shards prepared with the defaults, one folder per task)
# recorded with the code before class-grouped shards (commit 1c2c6cb: the streaming pipeline), same command
MAIN_DIGITS_CORRECT = [[35], [0, 42], [0, 30, 5], [0, 0, 0, 36], [0, 0, 0, 0, 36]]
MAIN_DIGITS_TOTALS = [71, 72, 73, 71, 72]


@pytest.mark.slow
def test_format1_shards_train_exactly_as_before(digits_format1, tmp_path):
    """A shard set written before this change trains to the very accuracy matrix main's code gave."""
    run = tmp_path / "run"
    res = sdlora("train", "-b", "digits", "--data", str(digits_format1), "--run-dir", str(run), *sets())
    assert res.returncode == 0, res.stderr[-3000:]
    accuracy = metrics(run)["accuracy"]
    assert accuracy["correct"] == MAIN_DIGITS_CORRECT and accuracy["totals"] == MAIN_DIGITS_TOTALS
    assert json.loads((run / "run.json").read_text())["task_split"]["class_order_from"] == "fixed (format 1)"


def test_authors_train_crop_is_bilinear_when_asked():
    """data.train_interpolation=bilinear resizes the train crop as torchvision's RandomResizedCrop default does."""
    import random

    from PIL import Image

    from sdlora_dist.config import load_config
    from sdlora_dist.data.pipeline import _crop_box, train_crop
    from sdlora_dist.preprocess import transform_spec

    cfg = load_config(overrides=["data.train_interpolation=bilinear", "data.normalize=none", "data.hflip=0"])
    model = SimpleNamespace(pretrained_cfg={"input_size": (3, 16, 16), "interpolation": "bicubic"},
                            backbone=SimpleNamespace())  # fmt: skip
    spec = transform_spec(model, cfg.data)
    assert spec.train_interpolation == "bilinear" and spec.interpolation == "bicubic" and spec.mean == (0.0,) * 3
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 52, 3), dtype=np.uint8))
    box = _crop_box(52, 40, spec.train_scale, random.Random(5))
    got = np.asarray(train_crop(img, spec, random.Random(5)))
    assert np.array_equal(got, np.asarray(img.resize((16, 16), Image.BILINEAR, box=box)))
    assert not np.array_equal(got, np.asarray(img.resize((16, 16), Image.BICUBIC, box=box)))
    with pytest.raises(UserError, match="data.train_interpolation: must be one of"):
        load_config(overrides=["data.train_interpolation=cubic"])


def test_an_older_shard_set_is_repaired_in_its_own_layout(tmp_path):
    """The advice `data inspect --verify` prints for a damaged per-task set works as printed; no silent relayout."""
    import shlex

    from cli_helpers import cli

    old = tmp_path / "old"
    prepare("digits", None, old, progress=False, workers=1, layout="task")
    shard = old / load_manifest(old).task_shards("train", 1)[0].path
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    code, _, err = cli("data", "inspect", str(old), "--verify")
    assert code == 2 and "--layout task" in err
    advice = shlex.split(err.split("rewrite them with: ", 1)[1].strip())
    assert advice[:3] == ["sdlora", "data", "prepare"]
    code, _, err = cli(*advice[1:], "--workers", "1", "--no-progress")
    assert code == 0, err
    assert shard.read_bytes() == good and load_manifest(old).format == 1
    code, _, err = cli("data", "prepare", "--benchmark", "digits", "--out", str(old), "--workers", "1")
    assert code == 2 and "earlier version" in err and err.count("\n") == 1
