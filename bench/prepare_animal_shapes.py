"""Build a small real-image ImageFolder from the Animal-MNIST wheel on PyPI (issue 21's real-image benchmark).

    pip download --no-deps animal-mnist==0.4 -d /tmp/animal        # 2.6 MB wheel, MIT licence, data inside it
    python bench/prepare_animal_shapes.py --wheel /tmp/animal/animal_mnist-0.4-py3-none-any.whl --out /tmp/animals
    sdlora data prepare --benchmark imagefolder --root /tmp/animals --out /tmp/animals-shards --tasks 5

Animal-MNIST ("Animal-Shape", Mohammadi, 2025) holds 10,000 28x28 grayscale silhouettes of 10 animals (bear, bird,
cat, cow, dog, elephant, giraffe, horse, sheep, zebra), 1,000 each, as two gzip'd pickles inside the wheel. The
pickles are read with an unpickler that admits only numpy's array reconstruction (no arbitrary code). A seeded
subset of ``--train`` + ``--test`` images per class is written as ``train/<class>/*.png`` and ``test/<class>/*.png``;
the data is never committed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

DATA = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABELS = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
# the labels are 0-9 in the order the package's description lists the animals (checked by eye on a sample grid)
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar")}  # fmt: skip


class _ArraysOnly(pickle.Unpickler):
    """Unpickle numpy arrays and plain containers only."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in the dataset pickle")
        return super().find_class(module, name)


def _load(wheel: zipfile.ZipFile, name: str) -> object:
    return _ArraysOnly(io.BytesIO(gzip.decompress(wheel.read(name)))).load()


def load_arrays(wheel_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [N, 28, 28] uint8, integer labels [N] and the class names, from the wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        data, labels = _load(wheel, DATA), _load(wheel, LABELS)
    images = np.asarray(data)
    raw = np.asarray(labels)
    values = sorted({int(v) for v in raw.tolist()})
    if values != list(range(len(ANIMALS))):
        raise SystemExit(f"error: expected labels 0-9 in {wheel_path}, got {values[:12]}; is it animal-mnist 0.4?")
    names = list(ANIMALS)
    y = raw.astype(np.int64)
    if images.dtype != np.uint8:
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = np.clip(np.rint(images * scale), 0, 255).astype(np.uint8)
    return images.reshape(len(y), 28, 28), y, names


def write_folder(images: np.ndarray, y: np.ndarray, names: list[str], out: Path, train: int, test: int,
                 seed: int) -> dict[str, int]:  # fmt: skip
    """``train`` + ``test`` images per class (seeded choice) as PNGs; returns the counts written."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for label, name in enumerate(names):
        idx = rng.permutation(np.flatnonzero(y == label))[: train + test]
        for split, chosen in (("train", idx[:train]), ("test", idx[train:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).save(folder / f"{int(i):05d}.png")
            counts[split] += len(chosen)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", required=True, type=Path, help="animal_mnist-0.4-py3-none-any.whl")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=int, default=120, help="train images per class")
    parser.add_argument("--test", type=int, default=40, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, y, names = load_arrays(args.wheel)
    counts = write_folder(images, y, names, args.out, args.train, args.test, args.seed)
    print(f"wrote {counts['train']} train + {counts['test']} test images of {len(names)} classes to {args.out}")


if __name__ == "__main__":
    main()
