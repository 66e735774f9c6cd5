"""GPU tests (``@pytest.mark.gpu``): skipped, with the reason, wherever no CUDA device is visible.

Run them with ``pytest -m gpu tests/gpu`` (``bash bench/gpu_check.sh`` does, then benchmarks). The CLI runs here use
the tiny settings of ``tests/cli_helpers.py`` with ``DS_ACCELERATOR=cuda`` instead of ``cpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

NO_CUDA = "no CUDA device visible (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu`` test when CUDA is not available (decided once, at collection: no fixture runs)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def cuda_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI subprocesses started through ``cli_helpers`` select DeepSpeed's CUDA accelerator."""
    import cli_helpers

    monkeypatch.setitem(cli_helpers.ENV, "DS_ACCELERATOR", "cuda")


@pytest.fixture(scope="session")
def gpu_digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits benchmark as shards (no download)."""
    from sdlora_dist.data import prepare

    out = tmp_path_factory.mktemp("gpu_shards") / "digits"
    prepare("digits", None, out, progress=False)
    return out
