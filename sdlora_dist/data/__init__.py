"""Source layouts -> WebDataset task shards, manifest, and the per-task streaming pipeline."""

from sdlora_dist.data.loader import ShardLoader, make_eval_loader, make_train_loader
from sdlora_dist.data.manifest import Manifest, ShardInfo, load_manifest, verify_shards
from sdlora_dist.data.planning import train_steps_per_epoch
from sdlora_dist.data.prepare import add_task, inspect_table, prepare
from sdlora_dist.data.reading import LoaderStats
from sdlora_dist.data.sources import READERS
from sdlora_dist.data.transforms import TransformSpec

__all__ = [
    "READERS",
    "LoaderStats",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "TransformSpec",
    "add_task",
    "inspect_table",
    "load_manifest",
    "make_eval_loader",
    "make_train_loader",
    "prepare",
    "train_steps_per_epoch",
    "verify_shards",
]
