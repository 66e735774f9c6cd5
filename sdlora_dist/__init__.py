"""sdlora-dist: SD-LoRA class-incremental learning on Vision Transformers, distributed and exportable."""

from sdlora_dist._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
