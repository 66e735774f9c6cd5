"""Tiny source datasets in each supported layout, written by the tests, plus shard helpers for the data tests.

Every image of class ``c`` is filled with a colour derived from ``c`` and its index, so a test can tell from the
pixels alone which source image came back.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdlora_dist.config import DataConfig
from sdlora_dist.data import ShardLoader, TransformSpec, make_train_loader
from sdlora_dist.data.manifest import file_sha256, load_manifest, write_manifest
from sdlora_dist.data.transforms import eval_crop, normalize_batch, to_uint8_chw, train_crop


def colour(label: int, index: int) -> tuple[int, int, int]:
    """The fill colour of image ``index`` of class ``label`` (distinct per pair for small fixtures)."""
    return (40 + 20 * label, 30 + 9 * index, 200 - 15 * label)


def save_image(path: Path, label: int, index: int, size: tuple[int, int] = (20, 16), fmt: str | None = None) -> None:
    """Write a solid-colour image (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label, index)).save(path, format=fmt, quality=100)


def make_class_folders(root: Path, counts: dict[str, int], ext: str = "jpg", size: tuple[int, int] = (20, 16)) -> None:
    """``root/<class>/<i>.<ext>`` with ``counts[class]`` images each (class index = sorted position)."""
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            save_image(root / name / f"img_{i:03d}.{ext}", label, i, size)


def make_image_folder(root: Path, train: dict[str, int], test: dict[str, int], ext: str = "png") -> None:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; test images use indices after the train ones."""
    names = sorted(train)
    for label, name in enumerate(names):
        for i in range(train[name]):
            save_image(root / "train" / name / f"{i:03d}.{ext}", label, i)
        for i in range(test.get(name, 0)):
            save_image(root / "test" / name / f"{i:03d}.{ext}", label, 100 + i)


def make_cifar(root: Path, n_classes: int = 6, per_class_train: int = 3, per_class_test: int = 2) -> Path:
    """A CIFAR-100-style ``cifar-100-python/`` with ``train``, ``test`` and ``meta`` pickles of random 32x32 images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        labels = [c for c in range(n_classes) for _ in range(per)]
        data = rng.randint(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        names = [f"img_{split}_{i}.png".encode() for i in range(len(labels))]
        with open(folder / split, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels, b"filenames": names}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"cls{c:02d}".encode() for c in range(n_classes)]}, fh)
    return folder


def cifar_arrays(folder: Path, split: str) -> tuple[np.ndarray, list[int]]:
    """The fixture's HWC images and labels, as the reader should see them."""
    with open(folder / split, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), list(batch[b"fine_labels"])


DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def make_domainnet(root: Path, classes: tuple[str, ...] = ("apple", "bus", "cat", "dog")) -> dict[str, int]:
    """Six domains, one train and one test image per class each, with the official list files; returns counts."""
    counts = {"train": 0, "test": 0}
    for d, domain in enumerate(DOMAINS):
        for split in ("train", "test"):
            lines = []
            for label, name in enumerate(classes):
                rel = f"{domain}/{name}/{domain}_{label:03d}_{split}.jpg"
                save_image(root / rel, label, d * 2 + (split == "test"))
                lines.append(f"{rel} {label}")
                counts[split] += 1
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return counts


def make_cub(root: Path, n_classes: int = 4, per_class: int = 3) -> tuple[Path, int, int]:
    """A CUB-200-style ``CUB_200_2011/`` tree (the last image of each class is test); returns (base, train, test)."""
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    image_id = 0
    for c in range(n_classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {folder}")
        for i in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            save_image(base / "images" / rel, c, i)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {0 if i == per_class - 1 else 1}")
    for name, rows in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", classes),
    ):
        (base / name).write_text("\n".join(rows) + "\n")
    return base, n_classes * (per_class - 1), n_classes


def read_shard_set(shards_dir: Path) -> dict[str, list[dict]]:
    """Every sample of a shard set, read with plain ``tarfile``: split -> [{task, key, image, label, meta}].

    ``label`` is the global label in the manifest's default order (a class-grouped shard stores the class index,
    mapped through ``label_map``); ``stored`` is what the tar holds.
    """
    manifest = load_manifest(shards_dir)
    label_map = manifest.label_map or list(range(len(manifest.class_names)))
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for split in out:
        for task in range(manifest.num_tasks()):
            for shard in manifest.task_shards(split, task):
                groups: dict[str, dict[str, bytes]] = {}
                with tarfile.open(shards_dir / shard.path) as tar:
                    for m in tar.getmembers():
                        key, ext = m.name.split(".", 1)
                        groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
                for key, files in groups.items():
                    ext = "jpg" if "jpg" in files else "png"
                    out[split].append(
                        {
                            "task": task,
                            "key": key,
                            "ext": ext,
                            "image": files[ext],
                            "label": label_map[int(files["cls"])],
                            "stored": int(files["cls"]),
                            "meta": json.loads(files["json"]),
                        }
                    )
    return out


def rewrite_shard(shards_dir: Path, rel: str, corrupt_keys: set[str]) -> None:
    """Replace the image bytes of ``corrupt_keys`` in one shard by garbage and update the manifest's size, sha256
    and sample offsets."""
    path = shards_dir / rel
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            key, ext = m.name.split(".", 1)
            if key in corrupt_keys and ext in ("jpg", "png"):
                data = b"\x89PNG this is not an image" * 3
            members.append((m.name, data))
    offsets, key = [], None  # where each sample starts, then the end of the last one (the manifest's offsets)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name.split(".", 1)[0] != key:
                key = name.split(".", 1)[0]
                offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        offsets.append(tar.offset)
    manifest = load_manifest(shards_dir)
    for split in manifest.shards.values():
        for shards in split:
            for s in shards:
                if s.path == rel:
                    s.bytes, s.sha256, s.offsets = path.stat().st_size, file_sha256(path), offsets
    write_manifest(manifest, shards_dir)


def dir_listing(path: Path) -> list[str]:
    """Every file and folder under ``path`` (relative), sorted; [] when it does not exist."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def make_imagenet_r(root: Path, n_classes: int = 200, per_class: int = 5) -> list[str]:
    """``root/<wnid>/<i>.png`` for ``n_classes`` wnid-named class folders of tiny images; returns the wnids."""
    wnids = [f"n{1440000 + c:08d}" for c in range(n_classes)]
    for label, wnid in enumerate(wnids):
        for i in range(per_class):
            save_image(root / wnid / f"art_{i}.png", label % 10, i, size=(6, 6))
    return wnids


def train_loader(location: str | Path, task: int, *, batch_size: int, world_size: int = 1, **kw: Any) -> ShardLoader:
    """``make_train_loader`` with a per-rank ``batch_size``: keywords naming a ``DataConfig`` field (num_workers,
    streams, corrupt, bad_shard, cache_dir) go into the config, whose batch size is the global one; the rest to the
    loader. ``num_workers`` defaults to 0 here."""
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items() if k in DataConfig.model_fields}
    data = DataConfig(**{"num_workers": 0, **fields, "shards": str(location), "batch_size": batch_size * world_size})
    rest = {k: v for k, v in kw.items() if k not in fields}
    return make_train_loader(data, task, world_size=world_size, **rest)


def eval_transform(img: Image.Image, spec: TransformSpec) -> torch.Tensor:
    """The eval loader's transform of one image: resize, center crop, uint8 CHW, normalise."""
    return normalize_batch(to_uint8_chw(eval_crop(img, spec))[None], spec)[0]


def train_transform(img: Image.Image, spec: TransformSpec, rng: random.Random) -> torch.Tensor:
    """The train loader's transform of one image: seeded crop and flip, uint8 CHW, normalise."""
    return normalize_batch(to_uint8_chw(train_crop(img, spec, rng))[None], spec)[0]
