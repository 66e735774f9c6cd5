"""Own weights of any ViT (issue 24): the architecture read from the file's config.json or inferred from its
shapes, no silent resize into another patch or image size, the warnings a small data set needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import TINY, sdlora
from weights_fixtures import OWN_CLASSES, write_class_folders, write_timm_weights

from sdlora_dist.errors import UserError

SIZE_48 = {"img_size": 48, "patch_size": 8, "embed_dim": 192, "depth": 2, "num_heads": 3}


def resolve(weights: Path, tmp_path: Path, *sets: str):
    from sdlora_dist.jobs.frontdoor import resolve_config

    return resolve_config("digits", None, [f"model.weights={weights}", *sets], None, str(tmp_path / "run"))


def built(cfg):
    from sdlora_dist.model import build_backbone

    backbone = build_backbone(cfg.model)
    geometry = {
        "img_size": int(backbone.patch_embed.img_size[0]),
        "patch_size": int(backbone.patch_embed.patch_size[0]),
        "embed_dim": int(backbone.embed_dim),
        "depth": len(backbone.blocks),
        "num_heads": int(backbone.blocks[0].attn.num_heads),
    }
    return backbone, geometry


@pytest.mark.parametrize("config_json", [True, False])
def test_architecture_from_config_json_or_shapes_loads_every_tensor(tmp_path, capsys, config_json):
    """The digits recipe names another ViT (16 px, patch 4, avg pool): the file's architecture replaces it."""
    weights = write_timm_weights(tmp_path / "w", config_json=config_json)
    cfg = resolve(weights, tmp_path)
    backbone, geometry = built(cfg)
    assert geometry == SIZE_48 and backbone.loaded_weights["tensors"] > 20
    assert cfg.model.name == "vit_tiny_patch16_224"
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("architecture of "))
    if config_json:  # timm's save_for_hf records the create_model kwargs as model_args
        assert "(config.json architecture)" in line and "patch_size=8 (config.json model_args)" in line
        assert cfg.model.kwargs["img_size"] in (48, [48, 48])
    else:
        assert cfg.model.kwargs == SIZE_48
        assert "img_size=48 (state dict shapes: pos_embed tokens x patch size)" in line
        assert "depth=2 (state dict shapes: blocks.0..1)" in line
        assert "num_heads=3 (default of vit_tiny_patch16_224 (not in any shape))" in line
        assert "name vit_tiny_patch16_224 (nearest timm name for width 192)" in line


def test_user_kwargs_override_the_file_key_by_key(tmp_path, capsys):
    weights = write_timm_weights(tmp_path / "w", config_json=False)
    cfg = resolve(weights, tmp_path, "model.kwargs.num_heads=6")
    assert cfg.model.kwargs == {**SIZE_48, "num_heads": 6}
    assert built(cfg)[1]["num_heads"] == 6  # heads are in no shape: the file loads under any split of 192
    assert "num_heads=6 (model.kwargs)" in capsys.readouterr().err


def test_width_384_without_config_infers_heads_by_64_per_head(tmp_path):
    import timm
    from safetensors.torch import save_file

    from sdlora_dist.weights import weights_architecture

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1,
                              embed_dim=320, num_heads=5)  # fmt: skip
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    arch = weights_architecture(path)
    assert arch.name == "vit_base_patch16_224" and arch.kwargs["embed_dim"] == 320 and arch.kwargs["depth"] == 1
    assert arch.kwargs["num_heads"] == 5 and "width / 64 per head" in arch.sources["num_heads"]
    assert arch.kwargs["img_size"] == 32 and arch.kwargs["patch_size"] == 8


@pytest.mark.parametrize(
    "switches",
    [{"global_pool": "avg"}, {"qkv_bias": False}, {"reg_tokens": 2, "no_embed_class": True},
     {"class_token": False, "global_pool": "avg"}],
)  # fmt: skip
def test_options_that_decide_which_tensors_exist_are_inferred(tmp_path, switches):
    """A file saved from a ViT with avg pooling (fc_norm, no norm), no qkv bias, register tokens... loads."""
    import timm
    from safetensors.torch import save_file

    from sdlora_dist.config import ModelConfig
    from sdlora_dist.model import build_backbone
    from sdlora_dist.weights import weights_architecture

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1, **switches)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    arch = weights_architecture(path)
    assert {k: arch.kwargs[k] for k in switches} == switches
    backbone = build_backbone(ModelConfig(name=arch.name, kwargs=arch.kwargs, weights=str(path)))
    assert backbone.loaded_weights["tensors"] == len(model.state_dict())


def test_other_patch_or_image_size_is_refused_unless_resize_is_asked(tmp_path, capsys):
    weights = write_timm_weights(tmp_path / "w")
    cfg = resolve(weights, tmp_path, "model.kwargs={img_size: 64, patch_size: 16}")
    with pytest.raises(UserError) as info:
        built(cfg)
    message = str(info.value)
    assert "48 px images in 8 px patches" in message and "64 px in 16 px patches" in message
    assert "\n" not in message and "model.resize_embeddings=true" in message
    # the --set the message names, pasted, loads the file
    matching = message.split("pass --set ", 1)[1].split(" to match", 1)[0].strip("'")
    assert built(resolve(weights, tmp_path, matching))[1]["img_size"] == 48
    capsys.readouterr()
    resized = resolve(weights, tmp_path, "model.kwargs={img_size: 64, patch_size: 16}", "model.resize_embeddings=true")
    assert "model.resize_embeddings=true" in capsys.readouterr().err  # said at start
    backbone, geometry = built(resized)
    assert geometry["img_size"] == 64 and geometry["patch_size"] == 16 and backbone.loaded_weights["tensors"] > 20


def test_start_line_says_which_preprocessing_is_in_force_and_why(tmp_path, capsys):
    weights = write_timm_weights(tmp_path / "w")
    resolve(weights, tmp_path, "model.mean=[0.1, 0.2, 0.3]", "data.normalize=imagenet")
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("preprocessing sources: "))
    assert "mean from the config" in line
    assert f"std/interpolation/crop_pct from {weights.parent / 'config.json'}" in line
    assert "data.normalize=imagenet sets the mean/std" in line


def test_num_workers_default_follows_the_cores_per_rank(monkeypatch):
    import os

    from sdlora_dist.data.loader import workers_per_rank

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert workers_per_rank(None) == max(0, min(4, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert workers_per_rank(None) == 0 and workers_per_rank(3) == 3


@pytest.mark.slow  # prepares and starts a run: over 3 s
def test_one_class_tasks_warn_once_from_prepare_and_train(tmp_path):
    write_class_folders(tmp_path / "photos", OWN_CLASSES)
    shards = tmp_path / "shards"
    prep = sdlora("data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "photos"),
                  "--out", str(shards), "--tasks", "5")  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    warned = [x for x in prep.stderr.splitlines() if "hold one class" in x]
    assert len(warned) == 1 and "task(s) 1, 2, 3, 4 of [2, 1, 1, 1, 1]" in warned[0], prep.stderr
    assert "--tasks 3 or fewer" in warned[0]
    train = sdlora("train", "--data", str(shards), "--run-dir", str(tmp_path / "run"), "--dry-run",
                   "--set", "model.weights=random")  # fmt: skip
    assert train.returncode == 0, train.stderr
    warned = [x for x in train.stderr.splitlines() if "hold one class" in x]
    assert len(warned) == 1 and "task(s) 1, 2, 3, 4" in warned[0] and "data.tasks=3" in warned[0]
    # 6 samples per task, batch 128 (the generic recipe): said at start, with the batch that fits
    assert "fewer training samples than one global batch (data.batch_size=128)" in train.stderr
    assert "--set data.batch_size=6 or less" in train.stderr
    # the fix it names: no warning
    fixed = sdlora("train", "--data", str(shards), "--run-dir", str(tmp_path / "run"), "--dry-run",
                   "--set", "model.weights=random", "--set", "data.tasks=3", "--set", "data.batch_size=6")  # fmt: skip
    assert fixed.returncode == 0 and "hold one class" not in fixed.stderr and "global batch" not in fixed.stderr


@pytest.mark.slow
def test_weights_without_config_json_train_and_resize_only_when_asked(tmp_path):
    write_class_folders(tmp_path / "photos", OWN_CLASSES)
    weights = write_timm_weights(tmp_path / "w", config_json=False)
    shards = tmp_path / "shards"
    assert sdlora("data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "photos"),
                  "--out", str(shards), "--tasks", "2").returncode == 0  # fmt: skip
    small = ["--set", "train.epochs=2", "--set", "data.batch_size=6", "--set", "train.timeout_s=60"]
    run = tmp_path / "inferred"
    proc = sdlora("train", "--data", str(shards), "--run-dir", str(run), "--set", f"model.weights={weights}", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arch = json.loads((run / "run.json").read_text())["architecture"]
    assert {k: arch[k] for k in SIZE_48} == SIZE_48 and arch["name"] == "vit_tiny_patch16_224"
    assert arch["sources"]["img_size"] == "state dict shapes: pos_embed tokens x patch size"
    assert json.loads((run / "metrics.json").read_text())["accuracy"]["top1_curve"]

    other = ["--set", "model.kwargs={img_size: 32, patch_size: 16}"]
    refused = sdlora("train", "--data", str(shards), "--run-dir", str(tmp_path / "refused"),
                     "--set", f"model.weights={weights}", *small, *other)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "48 px images in 8 px patches" in last and "32 px in 16 px" in last
    assert not (tmp_path / "refused").exists()  # a failed start leaves no run directory
    resized = tmp_path / "resized"
    proc = sdlora("train", "--data", str(shards), "--run-dir", str(resized), "--set", f"model.weights={weights}",
                  *small, *other, "--set", "model.resize_embeddings=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resized / "run.json").read_text())["architecture"]["img_size"] == 32


@pytest.mark.slow
def test_export_refuses_a_file_of_another_run_without_force(digits_shards, tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):  # two runs of another seed: another config hash
        proc = sdlora("train", "--data", str(digits_shards), "--run-dir", str(runs / f"s{seed}"),
                      *[a for s in [*TINY, "model.weights=random", "model.name=vit_tiny_patch16_224",
                                     "train.tasks=1", "train.max_steps_per_epoch=2", f"train.seed={seed}"]
                        for a in ("--set", s)])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "model.onnx"
    first = sdlora("export", str(out), "--run", str(runs / "s1"), "--verify-images", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    before = out.read_bytes()
    # s2 is the newest: without --run export picks it, says so on stdout, and refuses s1's file
    again = sdlora("export", str(out), "--runs-root", str(runs), "--verify-images", "0")
    assert again.returncode == 2 and f"run: {runs / 's2'}" in again.stdout
    assert again.stderr.startswith("error: ") and again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert out.read_bytes() == before
    same = sdlora("export", str(out), "--run", str(runs / "s1"), "--verify-images", "0")  # its own run: replaced
    assert same.returncode == 0, same.stderr[-2000:]
    forced = sdlora("export", str(out), "--runs-root", str(runs), "--verify-images", "0", "--force")
    assert forced.returncode == 0 and f"run: {runs / 's2'}" in forced.stdout, forced.stderr[-2000:]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    run_hash = json.loads((runs / "s2" / "run.json").read_text())["config_hash"]
    assert props["sdlora.config_hash"] == run_hash
    shutil.rmtree(runs)
