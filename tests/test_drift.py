"""Drift compensation of stored class statistics (train.drift, issue 21): exact where it must be, runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import metrics, sdlora, sets
from safetensors.torch import load_file

from sdlora_dist import drift
from sdlora_dist import head_align as ha
from sdlora_dist.jobs.distributed import DistEnv

ENV = DistEnv(0, 1, 0, 0, torch.device("cpu"))


def _pairs(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, batch: int = 37) -> drift.FeaturePairs:
    """Features in batches as a loader would give them."""
    return drift.FeaturePairs(keys=[str(i) for i in range(len(labels))], labels=list(labels.split(batch)),
                              old=list(old.split(batch)), new=list(new.split(batch)))  # fmt: skip


def _data(seed: int = 0, n: int = 240, d: int = 6, n_cls: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat(n // n_cls)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return x + 2 * torch.randn(n_cls, d, generator=g, dtype=torch.float64)[y], y


def _known_map(d: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return a, torch.randn(d, generator=g, dtype=torch.float64)


def _stats(x: torch.Tensor, y: torch.Tensor, cov: str) -> dict[str, torch.Tensor]:
    return ha.finalize(ha.class_sums(x, y, int(y.max()) + 1, cov), cov)


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_the_fitted_map_recovers_a_known_linear_change():
    x, _ = _data()
    a, b = _known_map()
    sums = drift.reduce_paired_sums(_pairs(x, x @ a.T + b, torch.zeros(len(x))), x.shape[1], ENV.device)
    fitted = drift.fit_linear_map(sums, ridge=1e-9)
    assert not fitted.identity
    assert (fitted.weight - a).abs().max() < 1e-6 and (fitted.bias - b).abs().max() < 1e-6
    # ridge pulls towards the identity, not towards zero: a strong penalty leaves A close to I, b fitted freely
    strong = drift.fit_linear_map(sums, ridge=1e6)
    assert (strong.weight - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-3


@pytest.mark.parametrize("cov", ["full", "shared"])
def test_stats_moved_by_a_recovered_map_equal_stats_of_the_moved_features(cov, tiny_cfg):
    """Old classes (never seen again) get the statistics they would have under the new features."""
    old_classes, y_old = _data(seed=2)
    current, y_cur = _data(seed=3)
    a, b = _known_map()
    stored = _stats(old_classes, y_old, cov)
    cfg = tiny_cfg("train.head_align=gaussian", "train.drift=linear", "train.drift_ridge=1e-9")
    moved = ha.compensate_stats(stored, _pairs(current, current @ a.T + b, y_cur), cfg, ENV.device)
    want = _stats(old_classes @ a.T + b, y_old, cov)
    assert (moved["mean"] - want["mean"]).abs().max() < 1e-4
    key = "cov" if cov == "full" else "scatter"
    assert (moved[key] - want[key]).abs().max() / want[key].abs().max() < 1e-5
    assert torch.equal(moved["count"], stored["count"])


@pytest.mark.parametrize("mode", ["linear", "sdc"])
@pytest.mark.parametrize("cov", ha.COV_MODES)
def test_an_unmoved_backbone_leaves_the_stored_stats_bit_identical(mode, cov, tiny_cfg):
    x, y = _data(seed=4)
    stored = _stats(x, y, cov)
    cfg = tiny_cfg("train.head_align=gaussian", f"train.drift={mode}")
    moved = ha.compensate_stats(stored, _pairs(x, x.clone(), y), cfg, ENV.device)
    assert moved.keys() == stored.keys() and all(torch.equal(moved[k], stored[k]) for k in stored)


def test_raw_sums_under_an_affine_map_are_the_sums_of_the_mapped_points():
    x, y = _data(seed=5)
    a, b = _known_map(seed=6)
    count = torch.bincount(y).double()
    sums = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, y, x)
    new_sums, new_gram = drift.LinearMap(a, b).raw_sums(count, sums, x.T @ x)
    z = x @ a.T + b
    assert torch.allclose(new_sums, torch.zeros(3, 6, dtype=torch.float64).index_add_(0, y, z), atol=1e-9)
    assert torch.allclose(new_gram, z.T @ z, rtol=1e-10, atol=1e-8)
    shifts = torch.randn(3, 6, dtype=torch.float64)
    sh_sums, sh_gram = drift.shift_raw_sums(count, sums, x.T @ x, shifts)
    w = x + shifts[y]
    assert torch.allclose(sh_sums, torch.zeros(3, 6, dtype=torch.float64).index_add_(0, y, w), atol=1e-9)
    assert torch.allclose(sh_gram, w.T @ w, rtol=1e-10, atol=1e-8)


def test_sdc_moves_every_mean_by_a_uniform_translation():
    x, y = _data(seed=7)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25], dtype=torch.float64)
    pairs = _pairs(x, x + delta, y)
    means = _stats(x, y, "shared")["mean"]
    sigma2 = drift.sdc_sigma2(drift.reduce_paired_sums(pairs, 6, ENV.device), 1.0)
    shifts = drift.sdc_shifts(pairs, means, sigma2, ENV.device)
    assert (shifts - delta).abs().max() < 1e-9


def test_pairs_of_different_samples_are_refused():
    pairs = drift.FeaturePairs(old=[torch.zeros(2, 3)], new=[])
    with pytest.raises(RuntimeError, match="1 batches before the task but 0 after it"):
        list(pairs.batches())


def test_drift_without_stored_statistics_is_one_readable_config_error(tiny_cfg):
    from sdlora_dist.config import ConfigError

    with pytest.raises(ConfigError, match="train.drift: drift compensation needs stored statistics"):
        tiny_cfg("train.head=linear", "train.drift=linear")
    with pytest.raises(ConfigError, match="train.drift: .*got 'affine'"):
        tiny_cfg("train.head_align=gaussian", "train.drift=affine")


def test_none_adds_no_pass_and_no_record_key(tiny_cfg):
    from sdlora_dist.recipe import extra_heads_record

    cfg = tiny_cfg("train.head=linear")
    times: dict[str, float] = {}
    assert drift.before_task(cfg, None, 1, ENV, None, None, times) is None  # type: ignore[arg-type]
    assert drift.after_task(cfg, None, 1, ENV, None, None, None, times) is None  # type: ignore[arg-type]
    assert times == {} and extra_heads_record(cfg) == {}


# ---------------------------------------------------------------------------------------------------------------------
# Real passes and runs on digits shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("shards") / "digits"
    prepare("digits", None, out, tasks=3, progress=False)
    return out


def test_a_model_that_did_not_move_gives_the_identity_through_real_passes(shards, tiny_cfg):
    """The before and after passes over real shards pair sample by sample; no change -> stored stats unchanged."""
    from sdlora_dist.data import load_manifest
    from sdlora_dist.model import build_model
    from sdlora_dist.preprocess import transform_spec

    cfg = tiny_cfg(f"data.shards={shards}", "data.benchmark=digits", "train.head_align=gaussian",
                   "train.drift=linear", "data.eval_batch_size=50", "data.num_workers=0")  # fmt: skip
    manifest = load_manifest(shards)
    model = build_model(cfg)
    model.add_task(manifest.classes_per_task[0])
    spec = transform_spec(model, cfg.data)
    pairs = drift.collect_features(cfg, model, 1, ENV, spec, manifest)
    pairs = drift.collect_features(cfg, model, 1, ENV, spec, manifest, pairs)
    assert len(pairs.keys) == manifest.num_samples("train", 1) and len(pairs.old) == len(pairs.new) > 1
    assert drift.fit_linear_map(drift.reduce_paired_sums(pairs, 48, ENV.device), 0.1).identity
    x, y = _data(seed=8, d=48)
    stored = _stats(x, y, "shared")
    moved = ha.compensate_stats(stored, pairs, cfg, ENV.device)
    assert all(torch.equal(moved[k], stored[k]) for k in stored)


RUN = ("train.tasks=3", "train.head_align=gaussian", "train.head_align_cov=full", "train.head_align_epochs=2",
       "train.max_steps_per_epoch=12", "train.epochs=2")  # fmt: skip


@pytest.mark.slow
def test_two_ranks_compensate_as_one_process_does_from_the_same_checkpoints(shards, tmp_path):
    """A 2-rank, 2-worker run's cumulative, compensated statistics equal one process's computation from the run's
    own checkpoints (task t-1's model before, task t's after). Ranks train slightly different weights than 1 rank
    (gradient all-reduce order), so comparing against a 1-rank run would test the training, not the statistics."""
    from sdlora_dist.checkpoint import load_run_config, load_task_model
    from sdlora_dist.data import load_manifest
    from sdlora_dist.preprocess import transform_spec

    run_dir = tmp_path / "r2"
    proc = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node", "2",
                  *sets(*RUN, "train.drift=linear", "data.num_workers=2"), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_run_config(run_dir)
    cfg.data.num_workers = 0  # one process here; the sums do not depend on the worker count
    manifest = load_manifest(shards)
    classes = [r["classes"] for r in metrics(run_dir)["tasks"]]
    for task in (1, 2):
        before, after = load_task_model(run_dir, task - 1, cfg), load_task_model(run_dir, task, cfg)
        spec = transform_spec(after, cfg.data)
        pairs = drift.collect_features(cfg, after, task, ENV, spec, manifest,
                                       drift.collect_features(cfg, before, task, ENV, spec, manifest))  # fmt: skip
        want, info = ha.cumulative_stats(cfg, after, task, ENV, pairs)
        got = load_file(str(run_dir / "tasks" / f"task_{task:02d}" / "head_stats.safetensors"))
        assert got.keys() == want.keys() and len(got["count"]) == sum(classes[: task + 1])
        for key in got:
            assert torch.allclose(got[key].double(), want[key].double(), rtol=1e-5, atol=1e-6), (task, key)
        record = metrics(run_dir)["tasks"][task]
        assert record["drift"] == "linear" and "drift_before" in record["time_s"]
        assert record["head_align"]["drift_mean_shift"] == pytest.approx(info["drift_mean_shift"], rel=1e-4)
