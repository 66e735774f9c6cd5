"""Loader throughput per worker: the streaming shard reader (local and over HTTP) vs the seekable reader before
issue 11 (``baseline_pipeline()``: that commit's module, read out of git) vs a plain ImageFolder + PIL loader, same
train transform; plus time to the first batch and bytes read per epoch.

    python bench/bench_loader.py [--root DIR] [--images 400] [--reps 5] [--shard-size 50]
                                 [--out bench/results/bench_loader.json]

HTTP, two servers, each in its own process on 127.0.0.1: ``http``: werkzeug's file server (``send_from_directory``,
which answers Range with 206), read with ranged GETs from the manifest's per-sample offsets
(``sdlora_dist.data.byteranges``); ``http_forward``: the same shards behind a manifest without offsets, served by
``python -m http.server`` and read forward through curl (webdataset's opener): the reader before ranged reads.
Bytes read are counted on the streams ``urls.open_stream`` and ``byteranges.open_ranged`` return, for one epoch of
the task, against the sum of the task's shard sizes; they are given for ``--shard-size`` and for one shard holding
the whole task (where the 8 streams share one shard: see data/loader.py).

Without ``--root`` it makes a synthetic source: ``--images`` JPEGs at 500x375 (quality 90, smooth colour fields plus
noise, so they compress like photos) in 10 class folders ``train/<class>/`` (+ a small ``test/``). The shard set is
written by ``prepare`` with its default ``--resize 256``. Both loaders run in the main process (``num_workers=0``,
one core), decode to RGB and apply the same train transform (RandomResizedCrop 224 bicubic, scale 0.05-1, flip;
uint8 batches of 32 normalised with ImageNet mean/std in one step) with the same per-sample RNG; the plain loader
decodes the original 500x375 files, the shard loader the 256-short-side images read from tars. Figures are the
best of ``--reps`` alternating epochs (least disturbed by other load); medians are in the JSON too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlora_dist.config import DataConfig
from sdlora_dist.data import TransformSpec, byteranges, load_manifest, make_train_loader, prepare, urls
from sdlora_dist.data.transforms import normalize_batch, sample_rng, to_uint8_chw, train_crop

SPEC = TransformSpec(img_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
BATCH = 32
BASELINE_REV = "b7203ef"  # the last commit whose pipeline was the seekable tarfile reader (before issue 11)


@functools.cache
def baseline_pipeline() -> types.ModuleType:
    """``sdlora_dist/data/pipeline.py`` as of BASELINE_REV, read out of git: the baseline is that exact code, not a
    copy kept in the tree (needs a git checkout; the module's imports resolve against today's package)."""
    repo = Path(__file__).resolve().parents[1]
    path = f"{BASELINE_REV}:sdlora_dist/data/pipeline.py"
    source = subprocess.run(["git", "-C", str(repo), "show", path], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("baseline_pipeline")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class body runs
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def make_synthetic_source(root: Path, images: int, classes: int = 10, size: tuple[int, int] = (500, 375)) -> Path:
    """``root/train/<class>/*.jpg`` (+ one test image per class): photo-like JPEGs at ``size``."""
    rng = np.random.RandomState(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(images + classes):
        split, c = ("train", i % classes) if i < images else ("test", i - images)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) for _ in range(3)], -1)
        base += np.cos(yy / rng.uniform(20, 80))[..., None]
        pixels = np.clip(127 + 50 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / split / f"class_{c:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def plain_imagefolder_epoch(root: Path, seed: int) -> int:
    """ImageFolder + PIL: open each original file, same transform and per-sample RNG, batches of 32."""
    files = sorted((root / "train").rglob("*.jpg"))
    order = np.random.default_rng(seed).permutation(len(files))
    images = 0
    for start in range(0, len(files), BATCH):
        batch = []
        for pos in order[start : start + BATCH].tolist():
            with Image.open(files[pos]) as img:
                batch.append(to_uint8_chw(train_crop(img.convert("RGB"), SPEC, sample_rng(seed, pos))))
        normalize_batch(torch.stack(batch), SPEC)
        images += len(batch)
    return images


def shard_epoch(shards: str | Path, seed: int) -> int:
    """The streaming task pipeline over the same images (one task holding every class)."""
    loader = make_train_loader(_data(shards), 0, spec=SPEC, epoch=seed, seed=seed)
    return sum(x.shape[0] for x, _ in loader)


def _data(shards: str | Path) -> DataConfig:
    """One rank, no worker processes, batches of BATCH."""
    return DataConfig(shards=str(shards), batch_size=BATCH, num_workers=0)


def legacy_epoch(shards: Path, seed: int) -> int:
    """The seekable tarfile reader before issue 11, same arguments."""
    baseline = baseline_pipeline()
    loader = baseline.make_train_loader(shards, 0, spec=SPEC, batch_size=BATCH, epoch=seed, seed=seed, num_workers=0)
    return sum(x.shape[0] for x, _ in loader)


def first_batch_s(shards: str | Path) -> float:
    """Seconds from building the loader (manifest read included) to its first batch."""
    start = time.perf_counter()
    next(iter(make_train_loader(_data(shards), 0, spec=SPEC, epoch=0, seed=0)))
    return time.perf_counter() - start


class _Counting:
    """A stream wrapper that adds the bytes it returns to a shared counter."""

    def __init__(self, stream, counter: list[int]) -> None:  # noqa: ANN001
        self.stream, self.counter = stream, counter

    def read(self, *args) -> bytes:  # noqa: ANN002
        data = self.stream.read(*args)
        self.counter[0] += len(data)
        return data

    def seek(self, *args) -> int:  # noqa: ANN002  (a local shard skips a prefix by seeking over member data)
        return self.stream.seek(*args)

    def tell(self) -> int:
        return self.stream.tell()

    def close(self) -> None:
        self.stream.close()


def bytes_ratio(shards: str | Path) -> float:
    """Shard bytes read in one train epoch of task 0 / the task's shard bytes (local or URL: the bytes returned by
    every stream ``urls.open_stream`` and ``byteranges.open_ranged`` open)."""
    counter, original, ranged = [0], urls.open_stream, byteranges.open_ranged
    task_bytes = sum(s.bytes for s in load_manifest(shards).task_shards("train", 0))  # before counting starts
    # shard streams only: the manifest, read once per run, is not part of an epoch
    urls.open_stream = lambda url: _Counting(original(url), counter) if url.endswith(".tar") else original(url)

    def counted_ranged(url: str, begin: int, end: int) -> tuple[_Counting, int]:
        stream, start = ranged(url, begin, end)
        return _Counting(stream, counter), start

    byteranges.open_ranged = counted_ranged
    try:
        shard_epoch(shards, 0)
    finally:
        urls.open_stream, byteranges.open_ranged = original, ranged
    return counter[0] / task_bytes


def without_offsets(shards: Path, dest: Path) -> Path:
    """The same shards (symlinked) behind a manifest without per-sample offsets: a shard set written before they
    were recorded, read forward as before this change."""
    for path in shards.rglob("*.tar"):
        (dest / path.relative_to(shards)).parent.mkdir(parents=True, exist_ok=True)
        (dest / path.relative_to(shards)).symlink_to(path)
    raw = json.loads((shards / "manifest.json").read_text())
    for shard in (s for split in raw["class_shards"].values() for c in split for s in c):
        shard.pop("offsets")
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


def serve_with_ranges(root: str, port: int) -> None:
    """Serve ``root`` on 127.0.0.1:``port`` with werkzeug's ``send_file`` (answers Range with 206), until killed."""
    from werkzeug.exceptions import NotFound
    from werkzeug.serving import make_server
    from werkzeug.utils import send_from_directory

    def app(environ: dict, start_response):  # noqa: ANN202
        try:
            response = send_from_directory(root, environ["PATH_INFO"].lstrip("/"), environ, conditional=True)
        except NotFound as exc:
            response = exc
        return response(environ, start_response)

    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


@contextlib.contextmanager
def http_served(root: Path, ranges: bool) -> Iterator[str]:
    """An HTTP server for ``root`` on 127.0.0.1 in its own process; yields its URL. ``ranges``: werkzeug's file
    server (Range answered with 206); else ``python -m http.server`` (ignores Range: 200 and the whole file)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if ranges:
        cmd = [sys.executable, __file__, "--serve", str(root), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def _timed(fn, *args) -> tuple[float, int]:  # noqa: ANN001
    start = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - start, n


def _best(runs: list[tuple[float, int]]) -> float:
    return max(n / t for t, n in runs)


def _median(runs: list[tuple[float, int]]) -> float:
    return statistics.median(n / t for t, n in runs)


def measure(root: Path, tmp: Path, shard_size: int, reps: int) -> dict:
    """Every figure, with the loaders alternating so machine noise hits them alike."""
    shards = tmp / "shards"
    prepare("imagefolder", root, shards, tasks=1, shard_size=shard_size, progress=False)
    one_shard = tmp / "one_shard"
    prepare("imagefolder", root, one_shard, tasks=1, shard_size=10**6, progress=False)
    forward = without_offsets(shards, tmp / "forward")
    baseline_pipeline()  # read out of git before any timing
    # http: ranged GETs from a server with Range support; http_forward: the shard set without offsets from
    # python -m http.server, read forward through curl (the reader before ranged reads)
    runs: dict[str, list] = {"plain": [], "legacy": [], "local": [], "http": [], "http_forward": []}
    firsts: dict[str, list] = {"local": [], "http": []}
    with http_served(tmp, ranges=True) as server, http_served(tmp, ranges=False) as plain_server:
        url, forward_url = f"{server}/shards", f"{plain_server}/forward"
        for rep in range(reps):
            runs["plain"].append(_timed(plain_imagefolder_epoch, root, rep))
            runs["legacy"].append(_timed(legacy_epoch, shards, rep))
            runs["local"].append(_timed(shard_epoch, shards, rep))
            runs["http"].append(_timed(shard_epoch, url, rep))
            runs["http_forward"].append(_timed(shard_epoch, forward_url, rep))
            firsts["local"].append(first_batch_s(shards))
            firsts["http"].append(first_batch_s(url))
        http_bytes = {"http": bytes_ratio(url), "http_forward": bytes_ratio(forward_url),
                      "http_one_shard": bytes_ratio(f"{server}/one_shard")}  # fmt: skip
    best = {k: _best(v) for k, v in runs.items()}
    med = {k: _median(v) for k, v in runs.items()}
    return {
        "images_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "images_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "stream_local_vs_legacy": round(best["local"] / best["legacy"], 3),
        "stream_local_vs_legacy_median": round(med["local"] / med["legacy"], 3),
        "stream_http_vs_local": round(best["http"] / best["local"], 3),
        "stream_http_vs_local_median": round(med["http"] / med["local"], 3),
        "stream_http_forward_vs_local": round(best["http_forward"] / best["local"], 3),
        "stream_http_forward_vs_local_median": round(med["http_forward"] / med["local"], 3),
        "stream_local_vs_plain_imagefolder": round(best["local"] / best["plain"], 3),
        "first_batch_s_median": {k: round(statistics.median(v), 4) for k, v in firsts.items()},
        "bytes_read_vs_task_shard_bytes": round(bytes_ratio(shards), 4),
        "bytes_read_vs_task_shard_bytes_one_shard": round(bytes_ratio(one_shard), 4),
        "bytes_read_vs_task_shard_bytes_forward": round(bytes_ratio(forward), 4),
        **{f"bytes_read_vs_task_shard_bytes_{k}": round(v, 4) for k, v in http_bytes.items()},
        "shards": len(load_manifest(shards).task_shards("train", 0)),
        "train_images": load_manifest(shards).num_samples("train", 0),
        "shard_mb": round(sum(p.stat().st_size for p in shards.rglob("*.tar")) / 2**20, 2),
    }


def main() -> None:
    """Run the loaders, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="An ImageFolder tree (train/<class>/*.jpg); default synthetic.")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--size", default="500x375", help="Synthetic source image size WxH (originals).")
    parser.add_argument("--out", default="bench/results/bench_loader.json")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: the Range-capable server
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_with_ranges(args.serve, args.port)
        return
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_synthetic_source(Path(tmp) / "src", args.images, size=size)
        figures = measure(root, Path(tmp), args.shard_size, args.reps)
    result = {
        "benchmark": "loader images/s per worker (decode + train transform + batch), one core, num_workers=0",
        "source": args.root or f"synthetic: {args.images} JPEGs {args.size} q90 in 10 classes",
        "transform": {"img_size": SPEC.img_size, "interpolation": SPEC.interpolation, "scale": SPEC.train_scale},
        "batch": BATCH,
        "shard_size": args.shard_size,
        **figures,
        "reps": args.reps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": "python bench/bench_loader.py"
        + (f" --root {args.root}" if args.root else f" --size {args.size}")
        + f" --shard-size {args.shard_size}"
        + (f" --out {args.out}" if args.out != "bench/results/bench_loader.json" else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
