"""Shared fixtures: seeded tiny ViTs (img 32, a few blocks), CPU only, and one digits shard set per session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(2)
# A runner started in the background (nohup, `cmd &` in a script) hands its processes SIGINT ignored, and an ignored
# signal stays ignored across exec: every process the tests start would shrug off the Ctrl-C they send. A handled
# signal is reset to the default in a child, so handling it here gives the children what a terminal gives them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DIGITS_SHARD_SIZE = 37  # 287 train samples per digits task = 7 x 37 + 28: uneven shards in every task
TINY_VIT = "{img_size: 32, patch_size: 8, depth: 3, embed_dim: 48, num_heads: 3}"


def tiny_overrides(*extra: str) -> list[str]:
    """Overrides for a seeded tiny random-init ViT (3 blocks, width 48, 17 tokens) with the paper's linear head: the
    runs these tests build by hand save no ridge statistics (the default ridge head is tested by test_ridge_head.py
    and every ``sdlora train`` run of the suite)."""
    return ["model.name=vit_tiny_patch16_224", "model.weights=random", f"model.kwargs={TINY_VIT}", "train.head=linear",
            *extra]  # fmt: skip


@pytest.fixture
def tiny_cfg():
    """A factory: ``tiny_cfg("adapter.preset=official", ...)`` -> validated Config."""
    from sdlora_dist.config import load_config

    def make(*extra: str):
        return load_config(overrides=tiny_overrides(*extra))

    return make


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits (bundled in scikit-learn) prepared once per session with the paper's split (5 tasks, seed 1993) in
    shards of 37 samples, so every task has a short last shard (287 = 7 x 37 + 28). Read-only: a test that damages
    or extends shards works on its own copy (``shutil.copytree``) or prepares its own set."""
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("shards") / "digits"
    prepare("digits", None, out, shard_size=DIGITS_SHARD_SIZE, progress=False, workers=2)
    return out


@pytest.fixture(autouse=True)
def _log_level_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts at the default log level: ``sdlora -q``/``-v`` export SDLORA_LOG_LEVEL so launched ranks
    follow it, and a CLI call made in this process by an earlier test would otherwise silence later tests' output."""
    monkeypatch.delenv("SDLORA_LOG_LEVEL", raising=False)
