"""The analytic ridge head (train.head=ridge, issue 21): closed form == direct lstsq, runs, resumes, exports."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import error_line, kill_at_engine_checkpoint, metrics, sdlora, sets
from safetensors.torch import load_file

from sdlora_dist import ridge_head as rh


def _direct_solve(hidden: torch.Tensor, labels: torch.Tensor, num_classes: int, lam_rel: float) -> torch.Tensor:
    """argmin ||H W - Y||^2 + lam ||W||^2 by least squares on the stacked system [H; sqrt(lam) I] W = [Y; 0]."""
    n, m = hidden.shape
    lam = lam_rel * float((hidden * hidden).sum()) / m
    y = torch.nn.functional.one_hot(labels, num_classes).double()
    a = torch.cat([hidden, lam**0.5 * torch.eye(m, dtype=torch.float64)])
    b = torch.cat([y, torch.zeros(m, num_classes, dtype=torch.float64)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T  # [C, M]


def test_closed_form_from_batched_sums_equals_direct_least_squares():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat(60)
    feats += 2 * torch.randn(5, 16, generator=g, dtype=torch.float64)[labels]
    proj = rh.random_projection(16, 64, seed=3)
    total = None
    for f, y in zip(feats.split(41), labels.split(41), strict=True):
        part = rh.ridge_sums(rh.project(f, proj), y, 5)
        total = part if total is None else {k: total[k] + part[k] for k in part}
    got = rh.solve(total["gram"], total["sums"], 0.01)
    want = _direct_solve(rh.project(feats, proj), labels, 5, 0.01)
    assert (got - want).abs().max() / want.abs().max() < 1e-8
    assert torch.equal(rh.random_projection(16, 64, seed=3), proj)  # a function of the seed only


def test_plain_layers_and_the_merged_model_compute_the_ridge_head(tiny_cfg):
    from sdlora_dist.model import build_model

    model = build_model(tiny_cfg())
    model.add_task(3)
    g = torch.Generator().manual_seed(1)
    model.inference_head = rh.RidgeHead(rh.random_projection(48, 32, 5), torch.randn(3, 32, generator=g))
    x = torch.randn(4, 3, 32, 32, generator=g)
    model.eval()
    with torch.no_grad():
        want = model(x)
        feats = model.features(x)
        assert torch.allclose(model.inference_head.plain()(feats), want, atol=1e-5)
        merged = model.merge()
        assert isinstance(merged.head, torch.nn.Sequential)
        assert torch.allclose(merged(x), want, atol=1e-4)
    assert not any("inference_head" in k for k in model.state_dict())  # the task folder's statistics hold it


def test_ridge_with_gaussian_alignment_is_one_readable_config_error(tiny_cfg):
    from sdlora_dist.config import ConfigError

    with pytest.raises(ConfigError, match="train.head: head=ridge replaces the aligned .*set train.head=linear"):
        tiny_cfg("train.head_align=gaussian", "train.head=ridge")
    with pytest.raises(ConfigError, match=r"train.ridge_dim: must be > 0 \(got 0\)"):
        tiny_cfg("train.head=ridge", "train.ridge_dim=0")


def test_ridge_is_the_default_head_and_the_paper_recipes_keep_the_papers(tiny_cfg, tmp_path):
    from sdlora_dist.checkpoint import load_run_config
    from sdlora_dist.config import config_from_dict, config_yaml, load_config
    from sdlora_dist.jobs.frontdoor import benchmark_recipes

    assert load_config().train.head == "ridge"
    aligned = load_config(overrides=["train.head_align=gaussian"])
    assert aligned.train.head == "linear"  # the head it aligns, when none is named
    heads = {name: load_config(path).train.head for name, path in benchmark_recipes().items()}
    assert heads.pop("digits") == heads.pop("generic") == "ridge"
    assert set(heads.values()) == {"linear"} and {"imagenet-r", "cifar100", "domainnet"} <= set(heads), heads
    # a run written before train.head existed trained and evaluated the paper's head: it still loads as such
    old = config_from_dict(yaml.safe_load(config_yaml(tiny_cfg("train.head=linear"))))
    raw = old.to_dict()
    del raw["train"]["head"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_config(tmp_path).train.head == "linear"


# ---------------------------------------------------------------------------------------------------------------------
# End to end (real CLI runs on digits shards in 3 tasks)

RIDGE = ("train.tasks=3", "train.head=ridge", "train.ridge_dim=96", "train.checkpoint_every=2",
         "train.max_steps_per_epoch=12", "train.epochs=2")  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("shards") / "digits"
    prepare("digits", None, out, tasks=3, progress=False)
    return out


def _train(shards: Path, run_dir: Path, *extra: str, ranks: int = 1) -> None:
    proc = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(run_dir), "--gpus-per-node",
                  str(ranks), *sets(*extra), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _stats(run_dir: Path, task: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "tasks" / f"task_{task:02d}" / "head_stats.safetensors"))


@pytest.fixture(scope="module")
def ridge_run(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ridge") / "ref"
    _train(shards, run_dir, *RIDGE)
    return run_dir


@pytest.fixture(scope="module")
def ridge_drift_run(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ridge") / "ref_drift"
    _train(shards, run_dir, *RIDGE, "train.drift=linear")
    return run_dir


@pytest.mark.slow
def test_the_run_head_is_the_least_squares_solve_on_each_tasks_features(shards, ridge_run):
    """drift none: task j's samples under the model after task j (as stored), all seen classes, one solve."""
    from sdlora_dist.checkpoint import load_run_config, load_task_model
    from sdlora_dist.data import make_eval_loader
    from sdlora_dist.preprocess import transform_spec

    cfg = load_run_config(ridge_run)
    hidden, labels = [], []
    for task in range(3):
        model = load_task_model(ridge_run, task, cfg).eval()
        loader = make_eval_loader(shards, [task], spec=transform_spec(model, cfg.data), batch_size=10_000,
                                  split="train")  # fmt: skip
        (x, y), *rest = list(loader)
        assert not rest
        with torch.no_grad():
            hidden.append(rh.project(model.features(x), _stats(ridge_run, task)["ridge_projection"]))
        labels.append(y)
    stats = _stats(ridge_run, 2)
    want = _direct_solve(torch.cat(hidden), torch.cat(labels), len(stats["ridge_count"]), cfg.train.ridge_lambda)
    assert (stats["ridge_weight"].double() - want).abs().max() / want.abs().max() < 1e-4
    record = metrics(ridge_run)["tasks"][2]
    assert record["head"] == "ridge" and {"features_after", "ridge_stats", "ridge_solve"} <= set(record["time_s"])


@pytest.mark.slow
def test_resume_after_kill_and_continue_give_the_same_ridge_head(shards, ridge_drift_run, tmp_path):
    """With drift on, so the before-task pass is repeated from the previous task's checkpoint too."""
    ridge_run, drift_on = ridge_drift_run, ("train.drift=linear",)
    killed = tmp_path / "killed"
    args = ["train", "-b", "digits", "--data", str(shards), "--run-dir", str(killed), *sets(*RIDGE, *drift_on)]
    kill_at_engine_checkpoint(args, killed, task=1)
    assert not (killed / "tasks" / "task_01").exists()
    resumed = sdlora("train", "--resume", str(killed), timeout=900)
    assert resumed.returncode == 0 and "resumed from engine checkpoint" in resumed.stderr, resumed.stderr[-3000:]
    partial = tmp_path / "partial"
    _train(shards, partial, *RIDGE, *drift_on, "train.tasks=2")
    cont = sdlora("train", "--continue", str(partial), timeout=900)
    assert cont.returncode == 0, cont.stderr[-3000:]
    for run_dir in (killed, partial):
        for task in range(3):
            got, want = _stats(run_dir, task), _stats(ridge_run, task)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (run_dir, task)
        assert metrics(run_dir)["accuracy"]["correct"] == metrics(ridge_run)["accuracy"]["correct"]


@pytest.mark.slow
def test_two_ranks_compute_what_one_process_computes_from_the_same_checkpoints(shards, tmp_path):
    """Ranks train slightly different weights than 1 rank (gradient all-reduce order), so the check is: the drift-
    compensated sums and the solved head of a 2-rank, 2-worker run equal one process's computation from the run's
    own checkpoints (task t-1's model before, task t's after), and both ranks installed the same head."""
    from sdlora_dist.checkpoint import load_run_config, load_task_model
    from sdlora_dist.data import load_manifest
    from sdlora_dist.drift import collect_features
    from sdlora_dist.jobs.distributed import DistEnv
    from sdlora_dist.preprocess import transform_spec

    run_dir = tmp_path / "r2"
    _train(shards, run_dir, *RIDGE, "train.drift=linear", "data.num_workers=2", ranks=2)
    logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank_*.log")))
    for task in range(3):
        heads = set(re.findall(rf"\[rank \d\] task {task}: ridge head checksum (\w+)", logs))
        assert logs.count(f"task {task}: ridge head checksum") == 2 and len(heads) == 1
    cfg = load_run_config(run_dir)
    cfg.data.num_workers = 0  # one process here; the sums do not depend on the worker count
    env, manifest = DistEnv(0, 1, 0, 0, torch.device("cpu")), load_manifest(shards)
    for task in (1, 2):
        before, after = load_task_model(run_dir, task - 1, cfg), load_task_model(run_dir, task, cfg)
        spec = transform_spec(after, cfg.data)
        pairs = collect_features(cfg, after, task, env, spec, manifest, collect_features(cfg, before, task, env, spec,
                                                                                         manifest))  # fmt: skip
        want = rh.run(cfg, after, task, env, pairs, {})
        got = _stats(run_dir, task)
        for key in rh.KEYS:
            assert torch.allclose(got[key].double(), want[key].double(), rtol=1e-5, atol=1e-7), (task, key)


@pytest.mark.slow
def test_export_of_a_ridge_run_is_verified_against_the_run_model(ridge_run, tmp_path):
    import onnx

    from sdlora_dist.checkpoint import load_run
    from sdlora_dist.export.inference import OnnxClassifier

    out = tmp_path / "ridge.onnx"
    proc = sdlora("export", str(out), "--run", str(ridge_run), "--verify-images", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_run(ridge_run)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = state.model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(OnnxClassifier(out, provider="cpu").run(x) - want).max() <= 1e-4
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Relu" in ops  # the projection's non-linearity is in the graph: backbone, P, ReLU, W
    assert metrics(ridge_run)["tasks"][-1]["drift"] == "none"


@pytest.mark.slow
def test_timm_format_of_a_ridge_run_is_one_clear_line_and_writes_nothing(ridge_run, tmp_path):
    out = tmp_path / "timm"
    proc = sdlora("export", str(out), "--run", str(ridge_run), "--format", "timm")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "train.head=ridge" in line and "--set train.head=linear" in line, line
    assert "Traceback" not in proc.stderr and not out.exists()
