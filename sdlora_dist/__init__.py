"""sdlora-dist: SD-LoRA class-incremental learning on Vision Transformers, distributed and exportable.

Where things are (one line per module and the path of a training step: docs/architecture.md): the ML core and the
run at this level, job control across processes in ``jobs/``, shards and streaming in ``data/``; the CLI installs
as ``sdlora_dist.cli`` and export/serving as ``sdlora_dist.export``.
"""

from sdlora_dist._compat import ensure_torchvision_importable

ensure_torchvision_importable()

def _installed_version() -> str:
    """pyproject.toml is the one source of the version, read back from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdlora-dist")
    except PackageNotFoundError:  # a checkout run without installing it
        return "0+unknown"


__version__ = _installed_version()
