"""Readers for the source layouts users have: each turns a root folder into a list of (image, native label) items.

A reader checks the layout first and raises UserError saying what it expected to find, so pointing a benchmark at
the wrong folder fails before anything is written. Native labels index ``Source.class_names`` (the source's own
order: sorted folder names, CIFAR's label ids, CUB's class ids, ...); the seeded class order is applied later.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlora_dist.errors import UserError, listed

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
    ignored: list[dict[str, str]] = field(default_factory=list)  # files in class folders that are not images

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


def _class_folders(
    root: Path, ignored: list[dict[str, str]] | None = None, rel_to: Path | None = None
) -> dict[str, list[Path]]:
    """``root/<class>/<image>`` -> {class: sorted image paths} over the sub-folders holding at least one image.

    Other files in a class folder (notes, ``.txt`` lists) are appended to ``ignored`` (path relative to ``rel_to``,
    default ``root``) with the reason, so they are counted as skipped instead of vanishing.
    """
    classes = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file())
        images = [p for p in files if _is_image(p)]
        if images:
            classes[sub.name] = images
            if ignored is not None:
                ignored += [_not_an_image(p, rel_to or root) for p in files if not _is_image(p)]
    return classes


def _not_an_image(path: Path, rel_to: Path) -> dict[str, str]:
    return {"path": str(path.relative_to(rel_to)), "reason": f"not an image file ({path.suffix or 'no extension'})"}


def _nested_root(root: Path, classes: dict[str, list[Path]]) -> Path | None:
    """The class folder that itself holds class folders (``--root`` one level too high), or None."""
    for name, images in classes.items():
        if len({p.parent for p in images}) > 1 and not any(p.parent == root / name for p in images):
            return root / name
    return None


def _items(root: Path, files: list[Path], label: int) -> list[SourceItem]:
    return [SourceItem(path=str(f.relative_to(root)), label=label, file=str(f)) for f in files]


Folders = dict[str, list[Path]]


def _split_folders(root: Path, benchmark: str) -> tuple[Folders, Folders, list[dict[str, str]]] | None:
    """A ``train/<class>/*`` + ``test/<class>/*`` tree (and its non-image files), or None without train/ and test/."""
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return None
    ignored: list[dict[str, str]] = []
    train, test = _class_folders(root / "train", ignored, root), _class_folders(root / "test", ignored, root)
    if not train:
        raise UserError(f"{root / 'train'} holds no class folders with images: expected train/<class>/<image>")
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise UserError(
            f"{benchmark}: test classes without training images under {root}: {listed(unknown)}; "
            "every test class needs a train/<class> folder"
        )
    return train, test, ignored


def read_image_folder(root: Path | None, split_seed: int = 0, benchmark: str = "imagefolder") -> Source:
    """Any ImageFolder tree: ``train/<class>/*`` and ``test/<class>/*`` (classes = sorted train folder names)."""
    root = _require_dir(root, benchmark)
    folders = _split_folders(root, benchmark)
    if folders is None:
        raise UserError(
            f"{benchmark}: {root} does not hold train/ and test/ folders; expected train/<class>/<image> and "
            "test/<class>/<image>"
        )
    train, test, ignored = folders
    names = sorted(train)
    index = {n: i for i, n in enumerate(names)}
    return Source(
        benchmark,
        names,
        [it for n in names for it in _items(root, train[n], index[n])],
        [it for n in sorted(test) for it in _items(root, test[n], index[n])],
        ignored,
    )


def _read_seeded_split(root: Path | None, split_seed: int, benchmark: str) -> Source:
    """Class folders with no official split (ImageNet-R/A): a seeded, per-class 80/20 split.

    A root that already holds ``train/`` and ``test/`` class folders (the reference code's layout) is used as is.
    """
    root = _require_dir(root, benchmark)
    if (root / benchmark).is_dir():  # the folder holding imagenet-r/, as CUB_200_2011/ and cifar-100-python/
        root = root / benchmark
    if _split_folders(root, benchmark) is not None:
        return read_image_folder(root, split_seed, benchmark)
    ignored: list[dict[str, str]] = []
    classes = _class_folders(root, ignored)
    nested = _nested_root(root, classes)
    if nested is not None:
        raise UserError(
            f"{benchmark}: {nested} holds class folders itself, so --root {root} is one level too high; "
            f"pass --root {nested}"
        )
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
    return Source(benchmark, names, train, test, ignored)


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
    if not any(Path(it.file).is_file() for it in splits["train"]):  # none at all: a wrong root, not lost files
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
    if splits[True] and not any(Path(it.file).is_file() for it in splits[True]):  # a wrong root, not lost files
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


# classes each benchmark defines; a shard set with fewer is refused unless it is a declared subset (--subset)
BENCHMARK_CLASSES: dict[str, int] = {
    "imagenet-r": 200,
    "imagenet-a": 200,
    "domainnet": 345,
    "cifar100": 100,
    "cub200": 200,
    "digits": 10,
}


def read_source(benchmark: str, root: str | Path | None, split_seed: int = 0, *, subset: bool = False) -> Source:
    """Look the benchmark up in READERS and read its source; UserError for unknown names and wrong layouts.

    A source with fewer classes than :data:`BENCHMARK_CLASSES` defines is refused (a wrong ``--root`` or a lost
    folder) unless ``subset`` declares it deliberate.
    """
    if benchmark not in READERS:
        raise UserError(f"unknown benchmark {benchmark!r}: valid benchmarks are {', '.join(READERS)}")
    source = READERS[benchmark](Path(root) if root is not None else None, split_seed)
    if not source.train:
        raise UserError(f"{benchmark}: no training images found under {root}")
    expected = BENCHMARK_CLASSES.get(benchmark)
    if expected is not None and len(source.class_names) < expected and not subset:
        raise UserError(
            f"{benchmark}: found {len(source.class_names)} classes under {root} but the benchmark has {expected} "
            f"(first found: {', '.join(source.class_names[:3])}); point --root at the folder holding all {expected}, "
            "or pass --subset to prepare a deliberate subset"
        )
    return source


def _group(benchmark: str, source: Source, item: SourceItem) -> str:
    """What a missing file is counted under: its domain for DomainNet, its class otherwise."""
    return item.path.split("/", 1)[0] if benchmark == "domainnet" else source.class_names[item.label]


def drop_missing(source: Source, max_missing: int) -> list[SourceItem]:
    """Remove listed images whose file does not exist; returns them.

    More than ``max_missing`` is a UserError giving the count per domain (DomainNet) or class, and the flag that
    accepts them.
    """
    missing = [it for it in source.train + source.test if it.file is not None and not Path(it.file).is_file()]
    if len(missing) > max_missing:
        counts = Counter(_group(source.benchmark, source, it) for it in missing).most_common()
        shown = ", ".join(f"{name}: {n}" for name, n in counts[:8]) + (", ..." if len(counts) > 8 else "")
        raise UserError(
            f"{source.benchmark}: {len(missing)} listed image(s) are missing ({shown}), more than --max-missing "
            f"{max_missing}; restore them, or pass --max-missing {len(missing)} to prepare without them "
            "(the count is recorded in the manifest)"
        )
    gone = {id(it) for it in missing}
    source.train = [it for it in source.train if id(it) not in gone]
    source.test = [it for it in source.test if id(it) not in gone]
    return missing


def check_classes_complete(source: Source) -> None:
    """UserError naming every class left with no train or no test image (it could be neither learnt nor scored)."""
    n_train = Counter(it.label for it in source.train)
    n_test = Counter(it.label for it in source.test)
    empty = [i for i in range(len(source.class_names)) if not n_train[i] or not n_test[i]]
    if empty:
        shown = listed(f"{source.class_names[i]} ({n_train[i]} train, {n_test[i]} test)" for i in empty)
        raise UserError(
            f"{source.benchmark}: {len(empty)} class(es) have no train or no test image: {shown}; "
            "restore their images or remove the classes from the source"
        )
