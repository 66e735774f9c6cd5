"""Classifier alignment from class statistics (train.head_align, issue 13): math, no-op default, runs end to end."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import kill_at_engine_checkpoint, metrics, sdlora, sets
from safetensors.torch import load_file

from sdlora_dist import head_align as ha

# ---------------------------------------------------------------------------------------------------------------------
# Pure tensor functions


def _features(seed: int = 0, n_cls: int = 3, d: int = 5, per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(per_class)
    mix = torch.randn(n_cls, d, d, generator=g)
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64)
    x = torch.einsum("nd,nkd->nk", x, mix[y].double()) + 3 * torch.randn(n_cls, d, generator=g).double()[y]
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("cov", ha.COV_MODES)
def test_batched_sums_finalize_to_direct_statistics(cov):
    x, y = _features()
    total = None
    for xb, yb in zip(x.split(7), y.split(7), strict=True):  # uneven batches, classes missing from some
        total = ha.add_sums(total, ha.class_sums(xb, yb, 3, cov))
    stats = ha.finalize(total, cov)
    for c in range(3):
        xc = x[y == c]
        assert stats["count"][c] == len(xc)
        torch.testing.assert_close(stats["mean"][c].double(), xc.mean(0), atol=1e-5, rtol=0)
        if cov == "full":
            torch.testing.assert_close(stats["cov"][c].double(), torch.cov(xc.T), atol=1e-5, rtol=1e-5)
        if cov == "diag":
            torch.testing.assert_close(stats["var"][c].double(), xc.var(0), atol=1e-5, rtol=1e-5)
    if cov == "shared":
        centred = x - torch.stack([x[y == c].mean(0) for c in range(3)])[y]
        torch.testing.assert_close(stats["scatter"].double(), centred.T @ centred, atol=1e-4, rtol=1e-5)
        assert float(stats["dof"]) == len(x) - 3
        merged = ha.merge_tasks([stats, stats], cov)  # the same task twice: pooled covariance unchanged
        torch.testing.assert_close(merged["cov"], centred.T @ centred / (len(x) - 3), atol=1e-4, rtol=1e-5)


def test_sampled_features_follow_the_stored_gaussian():
    x, y = _features(per_class=400)
    stats = ha.merge_tasks([ha.finalize(ha.class_sums(x, y, 3, "full"), "full")], "full")
    roots = ha.covariance_roots(stats)
    draws, labels = ha.sample_features(stats["mean"], roots, 20000, torch.Generator().manual_seed(1))
    for c in range(3):
        got = draws[labels == c].double()
        torch.testing.assert_close(got.mean(0), stats["mean"][c].double(), atol=0.1, rtol=0)
        torch.testing.assert_close(torch.cov(got.T), stats["cov"][c].double(), atol=0.15, rtol=0.05)


def _biased_two_task_head(d: int = 6) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Four separable classes in two tasks; each task's rows trained with the masked loss only (the paper's head).

    Every feature shares a common component u (ViT features have a large common mean). Under the masked loss the
    gradients of one task's rows sum to zero, so the sum of its rows keeps its initial value: task 1's rows start
    with +u/2 each, which raises all of task 1's logits on every sample, and masked training never corrects it.
    """
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(d)
    u[-1] = 4.0
    centres = torch.stack([u + 2.0 * torch.eye(d)[c] for c in range(4)])
    tasks = []
    for t in range(2):
        y = torch.arange(2 * t, 2 * t + 2).repeat_interleave(200)
        tasks.append((centres[y] + 0.5 * torch.randn(len(y), d, generator=g), y))
    w = torch.zeros(4, d)
    w[2:] = u / 2  # the known bias: task 1's initial rows favour every sample
    w.requires_grad_(True)
    b = torch.zeros(4, requires_grad=True)
    for t, (x, y) in enumerate(tasks):
        opt = torch.optim.SGD([w, b], lr=0.1)
        for _ in range(200):
            loss = F.cross_entropy((x @ w.T + b)[:, 2 * t : 2 * t + 2], y - 2 * t)  # old logits masked
            opt.zero_grad()
            loss.backward()
            w.grad[: 2 * t] = 0  # old rows frozen
            b.grad[: 2 * t] = 0
            opt.step()
    return w.detach(), b.detach(), tasks


@pytest.mark.slow  # trains three task groups of a tiny ViT: over 2 s
@pytest.mark.parametrize("cov", ha.COV_MODES)
def test_alignment_removes_the_bias_between_task_groups(cov):
    w, b, tasks = _biased_two_task_head()
    g = torch.Generator().manual_seed(5)
    test_x = torch.cat([x + 0.1 * torch.randn(x.shape, generator=g) for x, _ in tasks])
    test_y = torch.cat([y for _, y in tasks])

    def accuracy(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return float(((test_x @ weight.T + bias).argmax(1) == test_y).float().mean())

    per_task = [ha.finalize(ha.class_sums(x, y - 2 * t, 2, cov), cov) for t, (x, y) in enumerate(tasks)]
    seen = ha.merge_tasks(per_task, cov)
    aligned = ha.align_head(w, b, seen, epochs=5, per_class=256, lr=0.05, batch_size=64,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    before, after = accuracy(w, b), accuracy(*aligned)
    assert before < 0.8  # the masked head confuses task 0's classes with task 1's
    assert after > 0.97 and after > before + 0.2
    again = ha.align_head(w, b, seen, epochs=5, per_class=256, lr=0.05, batch_size=64,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(aligned, again, strict=True))  # a function of the seed


def test_memory_formula_matches_the_issue():
    # ViT-B/16, one class, full covariance in fp32: 768^2 * 4 bytes = 2.36 MB (the issue's 2.4 MB)
    assert ha.stats_bytes("full", 1, 768) == 768 * 768 * 4 + 768 * 4 + 8
    assert ha.stats_bytes("full", 345, 768) > 0.8e9
    assert ha.stats_bytes("shared", 345, 768, 5) < 15e6
    assert ha.stats_bytes("diag", 345, 768) == 345 * (8 + 8 * 768)


# ---------------------------------------------------------------------------------------------------------------------
# The default changes nothing


def test_none_is_a_no_op(tiny_cfg):
    from sdlora_dist.jobs.distributed import DistEnv
    from sdlora_dist.model import build_model

    cfg = tiny_cfg()
    assert cfg.train.head_align == "none"
    model = build_model(cfg)
    model.add_task(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    def no_eval(*_):
        raise AssertionError("'none' must not evaluate")

    times: dict[str, float] = {}
    result = ha.run(cfg, model, 0, DistEnv(0, 1, 0, 0, torch.device("cpu")), None, None, no_eval, times)
    assert result.stats is None and result.record([1], [2]) == {"mode": "none"} and times == {}
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_head_align_settings_name_the_key(tiny_cfg):
    from sdlora_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.head_align: must be one of none, gaussian \(got 'slca'\)"):
        tiny_cfg("train.head_align=slca")
    with pytest.raises(ConfigError, match=r"train.head_align_cov: must be one of"):
        tiny_cfg("train.head_align_cov=low")
    with pytest.raises(ConfigError, match=r"train.head_align_epochs: must be > 0 \(got 0\)"):
        tiny_cfg("train.head_align_epochs=0")


# ---------------------------------------------------------------------------------------------------------------------
# End to end (real CLI runs on digits shards)

KILLABLE = ("train.checkpoint_every=2", "train.max_steps_per_epoch=12", "train.epochs=2")
GAUSSIAN = ("train.tasks=3", "train.head_align=gaussian", "train.head_align_cov=full", "train.head_align_epochs=2")


def _head(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "adapters.safetensors")).items() if k.startswith("head.")}


@pytest.mark.slow
def test_two_ranks_two_workers_stats_equal_one_direct_pass_and_heads_agree(digits_shards, tmp_path):
    from sdlora_dist.checkpoint import load_run_config, load_task_model
    from sdlora_dist.data import load_manifest, make_eval_loader
    from sdlora_dist.preprocess import transform_spec

    run_dir = tmp_path / "two"
    two = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                 "--gpus-per-node", "2", *sets("train.tasks=2", *GAUSSIAN[1:], "data.num_workers=2"))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank_*.log")))  # every rank's own output
    lines = re.findall(r"\[rank (\d)\] task (\d): aligned head checksum (\w+)", logs)
    by_task = {t: {r: h for r, tt, h in lines if tt == t} for _, t, _ in lines}
    assert sorted(by_task) == ["0", "1"] and all(len(set(v.values())) == 1 and len(v) == 2 for v in by_task.values())

    cfg = load_run_config(run_dir)
    manifest = load_manifest(digits_shards)
    for task in (0, 1):
        model = load_task_model(run_dir, task, cfg).eval()  # the model as it was when the statistics were taken
        loader = make_eval_loader(digits_shards, [task], spec=transform_spec(model, cfg.data), batch_size=10_000,
                                  split="train")  # fmt: skip
        (x, y), *rest = list(loader)
        assert not rest and len(y) == manifest.num_samples("train", task)
        with torch.no_grad():
            feats = model.features(x).double()
        stats = load_file(str(run_dir / "tasks" / f"task_{task:02d}" / "head_stats.safetensors"))
        for c in range(2):
            fc = feats[y == model.class_offset(task) + c]
            assert float(stats["count"][c]) == len(fc)
            assert (stats["mean"][c].double() - fc.mean(0)).abs().max() <= 1e-5
            assert (stats["cov"][c].double() - torch.cov(fc.T)).abs().max() <= 1e-5
    records = metrics(run_dir)["tasks"]
    assert [r["head_align"]["mode"] for r in records] == ["gaussian", "gaussian"]
    assert records[1]["head_align"]["after"]["top1"] == metrics(run_dir)["accuracy"]["top1_curve"][1]


@pytest.fixture(scope="module")
def gaussian_run(digits_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ha") / "ref"
    ref = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                 *sets(*GAUSSIAN, *KILLABLE))  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_statistics_and_head(digits_shards, gaussian_run, tmp_path):
    run_dir = tmp_path / "killed"
    extra = sets(*GAUSSIAN, *KILLABLE)
    args = ["train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir), *extra]
    kill_at_engine_checkpoint(args, run_dir, task=1)
    assert (run_dir / "tasks" / "task_00" / "head_stats.safetensors").is_file()
    assert not (run_dir / "tasks" / "task_01").exists()

    resumed = sdlora("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from engine checkpoint" in resumed.stderr
    for task in range(3):
        name = f"task_{task:02d}"
        got = load_file(str(run_dir / "tasks" / name / "head_stats.safetensors"))
        want = load_file(str(gaussian_run / "tasks" / name / "head_stats.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        got_head, want_head = _head(run_dir / "tasks" / name), _head(gaussian_run / "tasks" / name)
        assert all(torch.equal(got_head[k], want_head[k]) for k in want_head)
    assert metrics(run_dir)["accuracy"]["correct"] == metrics(gaussian_run)["accuracy"]["correct"]
    # alignment rewrote every seen row, so the last folder stores them all (not only its own task's)
    want_keys = {f"head.{part}.task_{t:02d}" for part in ("weight", "bias") for t in range(3)}
    assert set(_head(run_dir / "tasks" / "task_02")) == want_keys


@pytest.mark.slow
def test_none_trains_exactly_what_gaussian_trains_apart_from_the_head(digits_shards, gaussian_run, tmp_path):
    """The masked loss never reads old rows, so alignment must not change any adapter tensor; 'none' adds nothing.

    Adapter factors and magnitudes of every task are bit-identical between the two runs: the alignment step draws
    nothing from the global RNG and leaves the training path (data order, init, steps) untouched.
    """
    run_dir = tmp_path / "none"  # the paper's method: linear head, no alignment (the default head is ridge)
    none = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                  *sets("train.tasks=3", "train.head=linear", *KILLABLE))  # fmt: skip
    assert none.returncode == 0, none.stderr[-3000:]
    for task in range(3):
        folder = run_dir / "tasks" / f"task_{task:02d}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapters.safetensors", "layout.json", "progress.json"]
        got = load_file(str(folder / "adapters.safetensors"))
        want = load_file(str(gaussian_run / "tasks" / folder.name / "adapters.safetensors"))
        own_head = {f"head.{part}.task_{task:02d}" for part in ("weight", "bias")}
        # gaussian stores every (realigned) head row in each folder, none only its own task's
        assert got.keys() == {k for k in want if not k.startswith("head.") or k in own_head}
        assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("head."))
        assert not torch.equal(got[f"head.weight.task_{task:02d}"], want[f"head.weight.task_{task:02d}"])
    m_none, m_gauss = metrics(run_dir), metrics(gaussian_run)
    assert [t["head_align"] for t in m_none["tasks"]] == [{"mode": "none"}] * 3
    assert all(set(t["time_s"]) == {"consolidate", "train", "eval", "checkpoint"} for t in m_none["tasks"])
    assert m_gauss["tasks"][0]["head_align"]["before"]["correct"] == m_none["accuracy"]["correct"][0]


def test_missing_statistics_of_an_earlier_task_is_one_readable_error(tmp_path):
    from sdlora_dist.checkpoint import HEAD_STATS_FILE
    from sdlora_dist.errors import UserError

    (tmp_path / "tasks" / "task_00").mkdir(parents=True)
    with pytest.raises(UserError, match=f"task 0 of .* has no 'shared' head statistics \\({HEAD_STATS_FILE}\\)"):
        ha.load_previous_stats(tmp_path, 1, "shared")
    assert ha.load_previous_stats(tmp_path, 0, "shared") == []


def test_rank_agreement_checksum_covers_the_aligned_head(tiny_cfg):
    from sdlora_dist.model import build_model
    from sdlora_dist.recipe import adapter_checksum

    model = build_model(tiny_cfg())
    model.add_task(2)
    before = adapter_checksum(model)
    weight, bias = model.head.full()
    ha.set_head(model, weight, bias + 1e-3)  # what alignment writes; the checksum must see it
    assert adapter_checksum(model) != before
