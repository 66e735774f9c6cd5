"""Readers for the source layouts users have: each turns a root folder into a list of (image, native label) items.

A reader checks the layout first and raises UserError saying what it expected to find, so pointing a benchmark at
the wrong folder fails before anything is written. Native labels index ``Source.class_names`` (the source's own
order: sorted folder names, CIFAR's label ids, CUB's class ids, ...); the seeded class order is applied later.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlora_dist.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
TEST_FRACTION = 0.2  # ImageNet-R / ImageNet-A have no official split: seeded 80/20 per class


@dataclass
class SourceItem:
    """One source image: where it came from, its native label, and either a file to read or raw pixels."""

    path: str  # original path relative to the root (or a synthetic id for array sources), stored with the sample
    label: int  # native class index
    file: str | None = None  # absolute path of an image file
    pixels: np.ndarray | None = None  # HxW or HxWx3 uint8 for sources that ship arrays (CIFAR, digits)


@dataclass
class Source:
    """A benchmark's classes (native order) and its train/test items."""

    benchmark: str
    class_names: list[str]
    train: list[SourceItem]
    test: list[SourceItem]

    def fingerprint_payload(self) -> bytes:
        """Bytes that identify the dataset: class names, every item's path, label and size (or pixel hash)."""
        digest = hashlib.sha256()
        digest.update(self.benchmark.encode())
        digest.update("\0".join(self.class_names).encode())
        for split, items in (("train", self.train), ("test", self.test)):
            digest.update(split.encode())
            for item in items:
                if item.pixels is not None:
                    tag = hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).hexdigest()[:16]
                else:
                    tag = str(Path(item.file).stat().st_size) if item.file and Path(item.file).exists() else "-"
                digest.update(f"{item.path}\t{item.label}\t{tag}\n".encode())
        return digest.digest()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _require_dir(root: Path | None, benchmark: str) -> Path:
    if root is None:
        raise UserError(f"benchmark {benchmark!r} needs --root: the folder holding the dataset")
    if not root.exists():
        raise UserError(f"--root {root} does not exist: pass the folder holding the {benchmark} dataset")
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder: pass the folder holding the {benchmark} dataset")
    return root


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """``root/<class>/<image>`` -> {class: sorted image paths} over the sub-folders holding at least one image."""
    classes = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.rglob("*") if _is_image(p))
        if images:
            classes[sub.name] = images
    return classes


def _items(root: Path, files: list[Path], label: int) -> list[SourceItem]:
    return [SourceItem(path=str(f.relative_to(root)), label=label, file=str(f)) for f in files]


def _split_folders(root: Path, benchmark: str) -> tuple[dict[str, list[Path]], dict[str, list[Path]]] | None:
    """A ``train/<class>/*`` + ``test/<class>/*`` tree, or None when ``root`` has no train/ and test/ folders."""
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return None
    train, test = _class_folders(root / "train"), _class_folders(root / "test")
    if not train:
        raise UserError(f"{root / 'train'} holds no class folders with images: expected train/<class>/<image>")
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise UserError(
            f"{benchmark}: test classes without training images under {root}: {', '.join(unknown[:5])}; "
            "every test class needs a train/<class> folder"
        )
    return train, test


def read_image_folder(root: Path | None, split_seed: int = 0, benchmark: str = "imagefolder") -> Source:
    """Any ImageFolder tree: ``train/<class>/*`` and ``test/<class>/*`` (classes = sorted train folder names)."""
    root = _require_dir(root, benchmark)
    folders = _split_folders(root, benchmark)
    if folders is None:
        raise UserError(
            f"{benchmark}: {root} does not hold train/ and test/ folders; expected train/<class>/<image> and "
            "test/<class>/<image>"
        )
    train, test = folders
    names = sorted(train)
    index = {n: i for i, n in enumerate(names)}
    return Source(
        benchmark,
        names,
        [it for n in names for it in _items(root, train[n], index[n])],
        [it for n in sorted(test) for it in _items(root, test[n], index[n])],
    )


def _read_seeded_split(root: Path | None, split_seed: int, benchmark: str) -> Source:
    """Class folders with no official split (ImageNet-R/A): a seeded, per-class 80/20 split.

    A root that already holds ``train/`` and ``test/`` class folders (the reference code's layout) is used as is.
    """
    root = _require_dir(root, benchmark)
    if _split_folders(root, benchmark) is not None:
        return read_image_folder(root, split_seed, benchmark)
    classes = _class_folders(root)
    if not classes:
        raise UserError(
            f"{benchmark}: {root} holds no class folders with images; expected <root>/<class>/<image> "
            "(e.g. imagenet-r/n01443537/art_0.jpg) or train/ and test/ class folders"
        )
    names = sorted(classes)
    rng = np.random.RandomState(split_seed)
    train, test = [], []
    for label, name in enumerate(names):
        files = classes[name]
        perm = rng.permutation(len(files))
        n_test = int(round(len(files) * TEST_FRACTION))
        test_idx = set(perm[:n_test].tolist())
        train += _items(root, [f for i, f in enumerate(files) if i not in test_idx], label)
        test += _items(root, [f for i, f in enumerate(files) if i in test_idx], label)
    return Source(benchmark, names, train, test)


def read_imagenet_r(root: Path | None, split_seed: int = 0) -> Source:
    """ImageNet-R: 200 class folders (``imagenet-r/<wnid>/*.jpg``), seeded 80/20 split."""
    return _read_seeded_split(root, split_seed, "imagenet-r")


def read_imagenet_a(root: Path | None, split_seed: int = 0) -> Source:
    """ImageNet-A: 200 class folders (``imagenet-a/<wnid>/*.jpg``), seeded 80/20 split."""
    return _read_seeded_split(root, split_seed, "imagenet-a")


def _parse_domainnet_list(list_file: Path) -> list[tuple[str, int]]:
    entries = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{list_file}:{lineno}: expected '<domain>/<class>/<file> <label>' (got {line!r})")
        entries.append((parts[0], int(parts[1])))
    return entries


def read_domainnet(root: Path | None, split_seed: int = 0) -> Source:
    """DomainNet: the official ``<domain>_train.txt`` / ``<domain>_test.txt`` lists of all six domains.

    Each line is ``<domain>/<class>/<file> <label>``; class names come from the paths, labels from the lists.
    """
    root = _require_dir(root, "domainnet")
    missing = [
        f"{d}_{s}.txt" for d in DOMAINNET_DOMAINS for s in ("train", "test") if not (root / f"{d}_{s}.txt").is_file()
    ]
    if missing:
        raise UserError(
            f"domainnet: {root} lacks the official split lists {', '.join(missing)}; expected <domain>_train.txt and "
            f"<domain>_test.txt for all six domains ({', '.join(DOMAINNET_DOMAINS)}) next to the domain folders"
        )
    names: dict[int, str] = {}
    splits: dict[str, list[SourceItem]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for domain in DOMAINNET_DOMAINS:
            list_file = root / f"{domain}_{split}.txt"
            for rel, label in _parse_domainnet_list(list_file):
                parts = Path(rel).parts
                if len(parts) < 3:
                    raise UserError(f"{list_file}: path {rel!r} is not <domain>/<class>/<file>")
                if names.setdefault(label, parts[-2]) != parts[-2]:
                    raise UserError(f"{list_file}: label {label} names both {names[label]!r} and {parts[-2]!r}")
                splits[split].append(SourceItem(path=rel, label=label, file=str(root / rel)))
    if not splits["train"]:
        raise UserError(f"domainnet: the lists under {root} are empty")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"domainnet: labels in the lists under {root} are not 0..{len(names) - 1}")
    first = splits["train"][0]
    if not Path(first.file).is_file():
        raise UserError(
            f"domainnet: the lists name {first.path} but {first.file} does not exist; --root must hold the "
            "domain folders (clipart/, real/, ...) next to the lists"
        )
    return Source("domainnet", [names[i] for i in range(len(names))], splits["train"], splits["test"])


def _cifar_dir(root: Path) -> Path:
    for candidate in (root, root / "cifar-100-python"):
        if all((candidate / n).is_file() for n in ("train", "test", "meta")):
            return candidate
    raise UserError(
        f"cifar100: {root} does not hold the CIFAR-100 python pickles train, test and meta (or a "
        "cifar-100-python/ folder with them); download cifar-100-python.tar.gz and unpack it there"
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means the same thing to the user
        raise UserError(f"cifar100: {path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc


def read_cifar100(root: Path | None, split_seed: int = 0) -> Source:
    """CIFAR-100: the python pickle batches (``train``, ``test``, ``meta``); 32x32 images kept at 32x32."""
    folder = _cifar_dir(_require_dir(root, "cifar100"))
    meta = _unpickle(folder / "meta")
    try:
        names = [n.decode() for n in meta[b"fine_label_names"]]
    except (KeyError, TypeError) as exc:
        raise UserError(f"cifar100: {folder / 'meta'} has no fine_label_names") from exc
    splits = {}
    for split in ("train", "test"):
        batch = _unpickle(folder / split)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [int(x) for x in batch[b"fine_labels"]]
            files = [
                f.decode() for f in batch.get(b"filenames", [f"{i:05d}.png".encode() for i in range(len(labels))])
            ]
        except (KeyError, ValueError) as exc:
            raise UserError(f"cifar100: {folder / split} lacks data/fine_labels of 3x32x32 images ({exc})") from exc
        splits[split] = [
            SourceItem(path=f"{split}/{i:05d}_{files[i]}", label=labels[i], pixels=data[i]) for i in range(len(labels))
        ]
    return Source("cifar100", names, splits["train"], splits["test"])


def _read_table(path: Path, columns: int) -> list[list[str]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=columns - 1)
            if len(parts) != columns:
                raise UserError(f"{path}:{lineno}: expected {columns} columns (got {line!r})")
            rows.append(parts)
    return rows


def read_cub200(root: Path | None, split_seed: int = 0) -> Source:
    """CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and ``images/``."""
    root = _require_dir(root, "cub200")
    needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    base = next((c for c in (root, root / "CUB_200_2011") if all((c / n).is_file() for n in needed)), None)
    if base is None:
        raise UserError(
            f"cub200: {root} lacks {', '.join(needed)} (nor a CUB_200_2011/ folder with them); point --root at the "
            "unpacked CUB_200_2011 folder"
        )
    paths = dict(_read_table(base / "images.txt", 2))
    labels = {k: int(v) for k, v in _read_table(base / "image_class_labels.txt", 2)}
    is_train = {k: v.strip() == "1" for k, v in _read_table(base / "train_test_split.txt", 2)}
    if (base / "classes.txt").is_file():
        class_rows = {int(k): v for k, v in _read_table(base / "classes.txt", 2)}
    else:  # the class name is the image's folder, e.g. 001.Black_footed_Albatross
        class_rows = {labels[k]: Path(p).parent.name for k, p in paths.items()}
    ids = sorted(class_rows)
    if ids != list(range(1, len(ids) + 1)):
        raise UserError(f"cub200: class ids under {base} are not 1..{len(ids)}")
    splits: dict[bool, list[SourceItem]] = {True: [], False: []}
    for image_id, rel in sorted(paths.items(), key=lambda kv: int(kv[0])):
        if image_id not in labels or image_id not in is_train:
            raise UserError(f"cub200: image id {image_id} of images.txt has no class label or train/test flag")
        splits[is_train[image_id]].append(
            SourceItem(path=f"images/{rel}", label=labels[image_id] - 1, file=str(base / "images" / rel))
        )
    if splits[True] and not Path(splits[True][0].file).is_file():
        raise UserError(f"cub200: images.txt names {splits[True][0].path} but {splits[True][0].file} does not exist")
    return Source("cub200", [class_rows[i] for i in ids], splits[True], splits[False])


def read_digits(root: Path | None, split_seed: int = 0) -> Source:
    """scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes): seeded stratified 80/20 split.

    Pixels (0..16) are scaled to 0..255 and stored at their native 8x8 size.
    """
    if root is not None:
        raise UserError("benchmark 'digits' is bundled with scikit-learn: do not pass --root")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    rng = np.random.RandomState(split_seed)
    train, test = [], []
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * TEST_FRACTION))
        for pos, i in enumerate(idx.tolist()):
            item = SourceItem(path=f"digits/{i:04d}", label=label, pixels=images[i])
            (test if pos < n_test else train).append(item)
    return Source("digits", [str(i) for i in range(10)], train, test)


Reader = Callable[[Path | None, int], Source]

# name -> reader; `prepare` looks benchmarks up here (unknown names list these keys)
READERS: dict[str, Reader] = {
    "imagenet-r": read_imagenet_r,
    "imagenet-a": read_imagenet_a,
    "domainnet": read_domainnet,
    "cifar100": read_cifar100,
    "cub200": read_cub200,
    "imagefolder": read_image_folder,
    "digits": read_digits,
}

# (tasks, class-order seed) per benchmark, after the paper / the authors' configs (reference-sdlora.md section 6);
# imagefolder has no paper setting and needs --tasks.
DEFAULTS: dict[str, tuple[int | None, int]] = {
    "imagenet-r": (10, 1995),
    "imagenet-a": (10, 1993),
    "domainnet": (5, 1993),
    "cifar100": (10, 1993),
    "cub200": (10, 1993),
    "imagefolder": (None, 1993),
    "digits": (5, 1993),
}


def read_source(benchmark: str, root: str | Path | None, split_seed: int = 0) -> Source:
    """Look the benchmark up in READERS and read its source; UserError for unknown names and wrong layouts."""
    if benchmark not in READERS:
        raise UserError(f"unknown benchmark {benchmark!r}: valid benchmarks are {', '.join(READERS)}")
    source = READERS[benchmark](Path(root) if root is not None else None, split_seed)
    if not source.train:
        raise UserError(f"{benchmark}: no training images found under {root}")
    return source
