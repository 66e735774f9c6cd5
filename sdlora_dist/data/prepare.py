"""Source layouts -> class-grouped WebDataset shards + ``manifest.json`` (``sdlora data prepare`` / ``add-task``).

Shards are grouped by class (``train/class_0007/shard-000000.tar``): the class order and the task split are chosen
at train time (``data.classes``), so one shard set serves every order. ``--seed`` and ``--tasks`` only set the
default order and split recorded in the manifest.

Each sample is three tar members sharing a key: the image (``.jpg`` or ``.png``), ``.cls`` (the stored class index
as text) and ``.json`` (label, class name, original path), the layout
``webdataset.WebDataset`` reads. Tar headers are
fixed (mtime 0, root owner), so the same input gives byte-identical shards and checksums.

Atomicity: ``prepare`` writes into ``<out>.partial/`` and renames it to ``<out>`` only after the manifest is in
place. Every finished shard is renamed from a temp file and gets a ``.done`` record, so an interrupted prepare resumes
where it stopped (same inputs -> same fingerprint) and ``<out>`` never holds a manifest pointing at missing or
partial shards. ``add_task`` stages the new task the same way and rewrites the manifest last. Run again on a
finished shard set of the same input, ``prepare`` verifies every sha256 and rewrites the damaged or missing shards in
place (each through a temp file and a rename, the manifest last).

Ctrl-C: pool workers ignore SIGINT, so only the main process sees it; the pool is terminated on the way out and the
staging folder stays resumable.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from sdlora_dist.data import urls
from sdlora_dist.data.classes import even_split, one_class_warning, seeded_order
from sdlora_dist.data.images import ImageDecodeError, image_error_reason, is_plain, open_rgb
from sdlora_dist.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardInfo,
    atomic_write_text,
    command_from_args,
    damaged_shards,
    file_sha256,
    load_manifest,
    manifest_from_dict,
    verify_shards,
    write_manifest,
)
from sdlora_dist.data.reading import sample_offsets
from sdlora_dist.data.sources import (
    DEFAULTS,
    Source,
    SourceItem,
    check_classes_complete,
    drop_missing,
    read_image_folder,
    read_source,
)
from sdlora_dist.errors import UserError, listed
from sdlora_dist.logs import log_rank_zero, log_warning, progress_bar

JPEG_QUALITY = 95
STATE_NAME = "prepare-state.json"
MISSING_REASON = "missing: listed but not on disk (--max-missing)"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class ShardPlan:
    """What goes into one shard: its relative path and (key, item, global label, class name) per sample."""

    path: str
    split: str
    task: int
    samples: list[tuple[str, SourceItem, int, str]]


@dataclass
class Encoded:
    """An item encoded for a shard, or the reason it was skipped."""

    data: bytes | None
    ext: str
    reason: str | None = None


def class_order(num_classes: int, seed: int) -> list[int]:
    """The reference code's class order: ``np.random.seed(seed); np.random.permutation(n)``."""
    return seeded_order(num_classes, seed)


def split_classes(num_classes: int, tasks: int) -> list[int]:
    """Classes per task: equal shares, the first ``num_classes % tasks`` tasks take one more."""
    return even_split(num_classes, tasks, "--tasks")


# --------------------------------------------------------------------------------------------------------------------
# Encoding (runs in pool workers)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _downscaled_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode_item(item: SourceItem, resize: int) -> Encoded:
    """Read one source image, downscale it once if its short side exceeds ``resize`` (never upscale), encode it.

    Every image goes through the shared loader (:func:`sdlora_dist.data.images.open_rgb`: 16-bit, alpha, CMYK,
    EXIF orientation). A JPEG/PNG that needs no conversion and no resize keeps its original bytes (verified to
    decode); a resized image becomes JPEG; any other image becomes a PNG of its RGB conversion, so a shard holds
    only RGB or greyscale JPEG/PNG. Array sources (CIFAR, digits) become PNG at native size.
    """
    if item.pixels is not None:
        return Encoded(_encode(Image.fromarray(item.pixels), "PNG"), "png")
    try:
        raw = Path(item.file).read_bytes()
    except OSError as exc:
        return Encoded(None, "", f"unreadable file: {exc.strerror or exc}")
    try:
        with Image.open(io.BytesIO(raw)) as header:  # header only: format, mode, size, EXIF
            fmt, plain, size = header.format, is_plain(header), header.size
        if resize and min(size) > resize:
            img = open_rgb(raw, draft=_downscaled_size(size, resize))
            img = img.resize(_downscaled_size(img.size, resize), Image.BICUBIC, reducing_gap=3.0)
            return Encoded(_encode(img, "JPEG"), "jpg")
        img = open_rgb(raw)
        if plain:
            return Encoded(raw, "jpg" if fmt == "JPEG" else "png")
        return Encoded(_encode(img, "PNG"), "png")
    except ImageDecodeError as exc:
        return Encoded(None, "", f"corrupt image: {exc}")
    except _DECODE_ERRORS as exc:
        return Encoded(None, "", f"corrupt image: {image_error_reason(exc)}")


def _encode_star(args: tuple[SourceItem, int]) -> Encoded:
    return encode_item(*args)


# --------------------------------------------------------------------------------------------------------------------
# Shard files


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, str, int, dict]]) -> ShardInfo:
    """Write ``(key, image bytes, ext, label, meta)`` samples to ``path`` atomically; returns the shard's record
    (with the byte offset where each sample starts, for ranged reads)."""
    tmp = path.with_name(path.name + ".tmp")
    offsets = []
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, ext, label, meta in samples:
                offsets.append(tar.offset)  # where this sample's first header goes
                _tar_add(tar, f"{key}.{ext}", data)
                _tar_add(tar, f"{key}.cls", str(label).encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            offsets.append(tar.offset)  # the end of the last sample (the end-of-archive blocks follow)
        fh.flush()
        os.fsync(fh.fileno())
    sha, size = file_sha256(tmp), tmp.stat().st_size
    os.replace(tmp, path)
    return ShardInfo(path="", count=len(samples), bytes=size, sha256=sha, offsets=offsets)


def plan_class_shards(source: Source, shard_size: int, first_class: int = 0) -> list[ShardPlan]:
    """Assign every item to (split, class, shard): one folder per class, samples in source order.

    ``ShardPlan.task`` holds the stored class index (``first_class`` + the source's native index): the label the
    samples carry, whatever order a run later puts the classes in.
    """
    if shard_size <= 0:
        raise UserError(f"--shard-size must be >= 1 (got {shard_size})")
    plans = []
    for split, items in (("train", source.train), ("test", source.test)):
        by_class: list[list[SourceItem]] = [[] for _ in source.class_names]
        for item in items:
            by_class[item.label].append(item)
        for native, class_items in enumerate(by_class):
            c = first_class + native
            name = source.class_names[native]
            samples = [(f"{split}-c{c:04d}-{i:07d}", item, c, name) for i, item in enumerate(class_items)]
            for s, start in enumerate(range(0, max(len(samples), 1), shard_size)):
                path = f"{split}/class_{c:04d}/shard-{s:06d}.tar"
                plans.append(ShardPlan(path, split, c, samples[start : start + shard_size]))
    return plans


def _done_record(stage: Path, plan: ShardPlan) -> Path:
    p = stage / plan.path
    return p.with_name(f".{p.name}.done.json")


def _encoded_stream(plans: list[ShardPlan], resize: int, workers: int) -> Iterator[Encoded]:
    jobs = ((item, resize) for plan in plans for _, item, _, _ in plan.samples)
    if workers <= 1:
        yield from map(_encode_star, jobs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker killed by it mid-task leaves the
    # pool waiting forever for its result. Only the main process handles it, and terminate() ends the workers.
    # Ignored while forking too, so a Ctrl-C during start-up cannot reach a worker before its initializer runs.
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool = ctx.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
    try:
        yield from pool.imap(_encode_star, jobs, chunksize=8)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _finished(plans: list[ShardPlan], stage: Path) -> dict[str, tuple[ShardInfo, list[dict[str, str]]]]:
    """Record and skips of each shard an earlier, interrupted run finished (file and ``.done`` record present)."""
    finished = {}
    for plan in plans:
        done = _done_record(stage, plan)
        if done.is_file() and (stage / plan.path).is_file():
            state = json.loads(done.read_text())
            finished[plan.path] = (ShardInfo(**state["shard"]), state["skipped"])
    return finished


def _write_planned(
    plan: ShardPlan, stage: Path, encoded: Iterator[Encoded], bar: tqdm
) -> tuple[ShardInfo, list[dict[str, str]]]:
    """Write one shard from the next ``len(plan.samples)`` encoded items, then its ``.done`` record."""
    samples, skips = [], []
    for key, item, label, name in plan.samples:
        enc = next(encoded)
        bar.update(1)
        if enc.data is None:
            skips.append({"path": item.path, "reason": enc.reason or "unreadable"})
            continue
        meta = {"label": label, "class": name, "path": item.path}
        samples.append((key, enc.data, enc.ext, label, meta))
    (stage / plan.path).parent.mkdir(parents=True, exist_ok=True)
    info = write_shard(stage / plan.path, samples)
    info.path = plan.path
    atomic_write_text(_done_record(stage, plan), json.dumps({"shard": vars(info), "skipped": skips}))
    return info, skips


def write_shards(
    plans: list[ShardPlan], stage: Path, *, resize: int, workers: int, progress: bool, desc: str
) -> tuple[dict[str, ShardInfo], list[dict[str, str]]]:
    """Encode and write every planned shard under ``stage`` (resuming finished ones); returns records and skips."""
    written = _finished(plans, stage)
    todo = [plan for plan in plans if plan.path not in written]
    total = sum(len(p.samples) for p in todo)
    encoded = _encoded_stream(todo, resize, workers)
    disable = not progress or total == 0
    with closing(encoded), progress_bar(total=total, unit="img", desc=desc, disable=disable, leave=True) as bar:
        for plan in todo:
            written[plan.path] = _write_planned(plan, stage, encoded, bar)
    records = {plan.path: written[plan.path][0] for plan in plans}
    return records, [skip for plan in plans for skip in written[plan.path][1]]  # plan order, resumed or not


def _shard_lists(
    plans: list[ShardPlan], records: dict[str, ShardInfo], tasks: range
) -> dict[str, list[list[ShardInfo]]]:
    return {
        split: [[records[p.path] for p in plans if p.split == split and p.task == t] for t in tasks]
        for split in SPLITS
    }


def _clear_done_records(stage: Path) -> None:
    for record in stage.rglob(".*.done.json"):
        record.unlink()


def _report_skipped(skipped: list[dict[str, str]]) -> None:
    if skipped:
        shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log_warning(
            f"warning: skipped {len(skipped)} unreadable source image(s) (listed in the manifest): {shown}{more}"
        )


# --------------------------------------------------------------------------------------------------------------------
# prepare


def dataset_fingerprint(source: Source, options: dict) -> str:
    """Identity of a shard set: the source listing (paths, labels, sizes) plus every option that changes shards."""
    digest = hashlib.sha256(source.fingerprint_payload())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def _check_out(out: Path, fingerprint: str, benchmark: str) -> bool:
    """True when ``out`` already holds this exact shard set; UserError when it holds anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder path for the shard set")
    if (out / MANIFEST_NAME).is_file():
        existing = load_manifest(out)
        if existing.fingerprint == fingerprint:
            return True
        raise UserError(
            f"--out {out} already holds a different shard set (benchmark {existing.benchmark!r}, fingerprint "
            f"{existing.fingerprint[:12]}; this {benchmark!r} input has {fingerprint[:12]}): pass another --out "
            "or delete that folder first"
        )
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is a non-empty folder without {MANIFEST_NAME}: pass an empty or new folder")
    return False


@dataclass
class _Job:
    """What one ``prepare`` decided before writing: the checked source, its shard plan, the recorded arguments."""

    source: Source
    args: dict[str, Any]  # recorded in the manifest: rebuilds the exact prepare command
    order: list[int]
    per_task: list[int]
    plans: list[ShardPlan]
    fingerprint: str
    missing: list[SourceItem]
    workers: int
    progress: bool

    def write(self, plans: list[ShardPlan], folder: Path) -> tuple[dict[str, ShardInfo], list[dict[str, str]]]:
        """Encode and write ``plans`` under ``folder`` with this job's options."""
        return write_shards(
            plans, folder, resize=self.args["resize"], workers=self.workers, progress=self.progress,
            desc=f"prepare {self.source.benchmark}",
        )  # fmt: skip


def prepare(
    benchmark: str,
    root: str | Path | None,
    out: str | Path,
    *,
    tasks: int | None = None,
    seed: int | None = None,
    resize: int = 256,
    shard_size: int = 1000,
    split_seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    max_missing: int = 0,
    subset: bool = False,
) -> Manifest:
    """Write ``benchmark`` read from ``root`` as per-task shards under ``out``; returns the manifest.

    ``tasks``/``seed`` default to the paper's setting for the benchmark. Refuses an ``out`` that holds a different
    shard set; on one that holds this shard set, verifies every checksum and rewrites damaged or missing shards;
    resumes an interrupted run from ``<out>.partial``. Listed images that are missing are an error beyond
    ``max_missing``; fewer classes than the benchmark defines are an error unless ``subset``.
    """
    if resize < 0:
        raise UserError(f"--resize must be >= 0 (0 keeps the original size; got {resize})")
    if max_missing < 0:
        raise UserError(f"--max-missing must be >= 0 (got {max_missing})")
    args = {"benchmark": benchmark, "root": str(Path(root).absolute()) if root is not None else None, "tasks": tasks,
            "seed": seed, "resize": resize, "shard_size": shard_size, "split_seed": split_seed,
            "max_missing": max_missing, "subset": subset}  # fmt: skip
    job = _plan_job(args, workers or os.cpu_count() or 1, progress)
    out = Path(out)
    if _check_out(out, job.fingerprint, benchmark):
        return _repair(out, job)
    return _write_new(out, job)


def _plan_job(args: dict[str, Any], workers: int, progress: bool) -> _Job:
    """Read and check the source, fill in the paper's defaults, fingerprint the input and plan every shard."""
    benchmark = args["benchmark"]
    source = read_source(benchmark, args["root"], args["split_seed"], subset=args["subset"])
    default_tasks, default_seed = DEFAULTS[benchmark]
    args["tasks"] = args["tasks"] if args["tasks"] is not None else default_tasks
    if args["tasks"] is None:
        raise UserError(f"benchmark {benchmark!r} has no default task count: pass --tasks")
    args["seed"] = default_seed if args["seed"] is None else args["seed"]
    per_task = split_classes(len(source.class_names), args["tasks"])
    at_most = max(1, len(source.class_names) // 2)  # every task then has two classes or more
    warning = one_class_warning(
        per_task, f"pass --tasks {at_most} or fewer, or split at train time with data.tasks or data.classes_per_task"
    )
    if warning:
        log_warning(warning)
    # "layout" stays in the options so fingerprints of shard sets already written keep matching
    options = {**{k: args[k] for k in ("tasks", "seed", "resize", "shard_size", "split_seed")}, "layout": "class"}
    fingerprint = dataset_fingerprint(source, options)  # the listing as the metadata gives it, missing files too
    missing = drop_missing(source, args["max_missing"])
    check_classes_complete(source)
    order = class_order(len(source.class_names), args["seed"])
    plans = plan_class_shards(source, args["shard_size"])
    return _Job(source, args, order, per_task, plans, fingerprint, missing, workers, progress)


def _write_new(out: Path, job: _Job) -> Manifest:
    """Write the whole shard set into ``<out>.partial`` (resuming finished shards), then rename it to ``out``."""
    stage = out.with_name(out.name + ".partial")
    _open_stage(stage, job.fingerprint, job.args)
    records, skipped = job.write(job.plans, stage)
    try:
        _check_decoded_classes(job.source, skipped)
    except UserError:
        shutil.rmtree(stage)  # the same input fails the same way: nothing worth resuming
        raise
    skipped = job.source.ignored + [{"path": it.path, "reason": MISSING_REASON} for it in job.missing] + skipped
    manifest = _class_manifest(job, records, skipped)
    _clear_done_records(stage)
    (stage / STATE_NAME).unlink()
    write_manifest(manifest, stage)
    if out.is_dir():
        out.rmdir()  # empty (checked above); rename cannot replace it on every platform
    os.replace(stage, out)
    _report_skipped(skipped)
    return manifest


def _class_manifest(job: _Job, records: dict[str, ShardInfo], skipped: list[dict[str, str]]) -> Manifest:
    """The format-2 manifest of a class-grouped shard set (default order and split from --seed / --tasks)."""
    names = job.source.class_names
    lists = _shard_lists(job.plans, records, range(len(names)))
    raw = {
        "format": 2, "benchmark": job.source.benchmark, "fingerprint": job.fingerprint, "classes": names,
        "class_shards": {split: [[vars(s) for s in c] for c in lists[split]] for split in SPLITS},
        "seed": job.args["seed"], "class_order": job.order, "classes_per_task": job.per_task,
        "resize": job.args["resize"], "shard_size": job.args["shard_size"], "split_seed": job.args["split_seed"],
        "skipped": skipped, "missing": len(job.missing), "prepare_args": job.args,
    }  # fmt: skip
    return manifest_from_dict(raw)


def _check_decoded_classes(source: Source, skipped: list[dict[str, str]]) -> None:
    """The class check again after decoding: images that failed to decode may have emptied a class's split."""
    gone = {s["path"] for s in skipped}
    decoded = Source(
        source.benchmark,
        source.class_names,
        [it for it in source.train if it.path not in gone],
        [it for it in source.test if it.path not in gone],
    )
    check_classes_complete(decoded)


def _repair(out: Path, job: _Job) -> Manifest:
    """Verify every shard of an existing shard set of this input; rewrite the damaged or missing ones in place.

    Each shard is rewritten through a temp file and a rename, the manifest last: an interrupted repair leaves
    every shard either old or new, and running it again finishes the job.
    """
    manifest = load_manifest(out)
    checked, damaged = damaged_shards(manifest, out)
    if not damaged:
        if _fill_offsets(manifest, out):
            write_manifest(manifest, out)
            return manifest
        log_rank_zero(f"{out} already holds this shard set (fingerprint {job.fingerprint[:12]}) and its {checked} "
                      "shards verify: nothing to do")  # fmt: skip
        return manifest
    planned = {plan.path: plan for plan in job.plans}
    foreign = [shard.path for shard, _ in damaged if shard.path not in planned]
    if foreign:
        raise UserError(
            f"{len(foreign)} damaged shard(s) belong to tasks added with 'sdlora data add-task' "
            f"({listed(foreign, 3)}): restore them from a copy, or re-run add-task on a fresh prepare"
        )
    plans = [planned[shard.path] for shard, _ in damaged]
    records, _ = job.write(plans, out)
    for plan in plans:
        _done_record(out, plan).unlink()
    manifest.prepare_args = manifest.prepare_args or job.args  # a shard set from before they were recorded
    for shards in manifest.all_shards():
        shards[:] = [records.get(shard.path, shard) for shard in shards]
    _fill_offsets(manifest, out)
    write_manifest(manifest, out)
    log_rank_zero(f"rewrote {len(plans)} damaged or missing shard(s) in {out}: {', '.join(records)}")
    return manifest


def _fill_offsets(manifest: Manifest, out: Path) -> int:
    """Fill in the per-sample byte offsets of verified shards written before ``prepare`` recorded them (read from
    their tar headers), so remote streams can open them at any sample; returns how many shards lacked them."""
    lacking = [shard for shards in manifest.all_shards() for shard in shards if shard.offsets is None]
    for shard in lacking:
        shard.offsets = sample_offsets(out / shard.path)
    if lacking:
        log_rank_zero(f"{out}: recorded the sample offsets of {len(lacking)} verified shard(s) in {MANIFEST_NAME} "
                      "(streams open a shard at their first sample)")  # fmt: skip
    return len(lacking)


def _open_stage(stage: Path, fingerprint: str, args: dict[str, Any] | None = None) -> None:
    """Create ``stage`` or reuse it when it was left by an interrupted run over the same input; ``args`` (the
    prepare options) are kept in its state so ``data inspect`` can print the command that resumes it."""
    state = stage / STATE_NAME
    if stage.exists():
        try:
            same = json.loads(state.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            log_rank_zero(f"resuming the interrupted prepare in {stage}")
            return
        if not state.is_file() and any(stage.iterdir()):
            raise UserError(f"{stage} exists and was not written by 'sdlora data prepare': move or delete it")
        shutil.rmtree(stage)  # staging of an older, different input: start over
    stage.mkdir(parents=True)
    atomic_write_text(state, json.dumps({"fingerprint": fingerprint, "prepare_args": args}))


# --------------------------------------------------------------------------------------------------------------------
# add-task


def add_task(out_dir: str | Path, root: str | Path, *, workers: int | None = None, progress: bool = True) -> int:
    """Append one task of the new classes in ``root`` (``train/<class>/*``, ``test/<class>/*``); returns its index.

    Images get the shard set's resize and shard size; the new classes take the next labels in a seeded order and
    follow every prepared task, whatever order a run gives those. The manifest is rewritten last, so an interrupted
    add-task leaves the shard set as it was.
    """
    out = Path(out_dir)
    manifest = load_manifest(out)
    source = read_image_folder(Path(root), manifest.split_seed, benchmark="add-task")
    check_classes_complete(source)
    known = manifest.stored_names
    clash = sorted(set(source.class_names) & set(known))
    if clash:
        raise UserError(
            f"add-task: classes already in {out}: {listed(clash)}; a new task must bring only new classes"
        )
    fingerprint = dataset_fingerprint(source, {"resize": manifest.resize, "shard_size": manifest.shard_size})
    task = manifest.num_tasks()
    order = class_order(len(source.class_names), manifest.seed + task)
    offset = len(known)
    plans = plan_class_shards(source, manifest.shard_size, first_class=offset)
    folders = [f"class_{offset + n:04d}" for n in range(len(source.class_names))]
    stage = out / f".add-task-{task:03d}.partial"
    _open_stage(stage, fingerprint)
    records, skipped = write_shards(
        plans, stage, resize=manifest.resize, workers=workers or os.cpu_count() or 1,
        progress=progress, desc=f"add task {task}",
    )  # fmt: skip
    _clear_done_records(stage)
    skipped = source.ignored + skipped
    for split in SPLITS:
        for folder in folders:
            final = out / split / folder
            if final.exists():  # left by an add-task interrupted after its move: not in the manifest, replace it
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / split / folder, final)
    _append_task(manifest, source, order, offset, plans, records)
    manifest.skipped += skipped
    manifest.added_tasks.append({"task": task, "classes": [offset + n for n in order], "root": str(root),
                                 "fingerprint": fingerprint})  # fmt: skip
    write_manifest(manifest, out)
    shutil.rmtree(stage)
    _report_skipped(skipped)
    return task


def _append_task(manifest: Manifest, source: Source, order: list[int], offset: int, plans: list[ShardPlan],
                 records: dict[str, ShardInfo]) -> None:  # fmt: skip
    """Record the new classes (in ``order``) as the last task of the default split."""
    lists = _shard_lists(plans, records, range(offset, offset + len(order)))
    for split in SPLITS:
        manifest.class_shards[split] += lists[split]
    manifest.stored_names += list(source.class_names)
    manifest.default_order += [offset + n for n in order]
    manifest.default_split.append(len(order))


# --------------------------------------------------------------------------------------------------------------------
# inspect


def _check_not_interrupted(shards_dir: str | Path) -> None:
    """UserError naming the ``.partial`` folder and the resuming command when a prepare into ``shards_dir`` (or
    the ``.partial`` folder itself) was interrupted before its manifest was written."""
    if not urls.is_local(shards_dir):
        return
    folder = urls.local_path(shards_dir).absolute()
    if (folder / MANIFEST_NAME).is_file():
        return
    out = folder.with_name(folder.name.removesuffix(".partial"))
    stage = out.with_name(out.name + ".partial")
    try:
        args = json.loads((stage / STATE_NAME).read_text()).get("prepare_args")
    except (OSError, ValueError):
        return  # no interrupted prepare: load_manifest says what is missing
    command = command_from_args(args, out) if args else f"the same 'sdlora data prepare ... --out {out}' command"
    raise UserError(
        f"{out} holds no finished shard set: a 'sdlora data prepare' into it was interrupted and its work so far "
        f"is in {stage}; finish it with: {command}"
    )


def inspect_table(shards_dir: str | Path, *, verify: bool = False) -> str:
    """A text table of tasks, their classes and sample/shard counts; with ``verify`` checks every sha256 first."""
    _check_not_interrupted(shards_dir)
    manifest = load_manifest(shards_dir)
    lines = []
    if verify:
        n = verify_shards(manifest, shards_dir)
        lines.append(f"verified {n} shards: sizes and sha256 match the manifest")
    lines += [
        f"benchmark {manifest.benchmark}: {len(manifest.class_names)} classes, {manifest.num_tasks()} tasks, "
        f"class-order seed {manifest.seed}, resize {manifest.resize}, fingerprint {manifest.fingerprint[:12]}",
        f"{'task':>4}  {'labels':>11}  {'classes':>7}  {'train':>8}  {'test':>8}  {'shards':>6}  first classes",
    ]
    for t in range(manifest.num_tasks()):
        labels = manifest.task_labels(t)
        names = ", ".join(manifest.class_names[g] for g in labels[:3]) + (", ..." if len(labels) > 3 else "")
        n_shards = sum(len(manifest.task_shards(s, t)) for s in SPLITS)
        lines.append(
            f"{t:>4}  {f'{labels.start}-{labels.stop - 1}':>11}  {len(labels):>7}  "
            f"{manifest.num_samples('train', t):>8}  {manifest.num_samples('test', t):>8}  {n_shards:>6}  {names}"
        )
    total_train = sum(manifest.num_samples("train", t) for t in range(manifest.num_tasks()))
    total_test = sum(manifest.num_samples("test", t) for t in range(manifest.num_tasks()))
    lines.append(f"{'all':>4}  {'':>11}  {len(manifest.class_names):>7}  {total_train:>8}  {total_test:>8}")
    lines.append(_class_index_line(manifest.stored_names))
    if manifest.skipped:
        lines.append(f"{len(manifest.skipped)} source file(s) were unreadable at prepare time and skipped")
    if manifest.missing:
        lines.append(f"{manifest.missing} listed source image(s) were missing at prepare time (--max-missing)")
    return "\n".join(lines)


def inspect_record(shards_dir: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """What :func:`inspect_table` prints, as a JSON-ready dict (``sdlora data inspect --json``)."""
    manifest = load_manifest(shards_dir)
    verified = verify_shards(manifest, shards_dir) if verify else None
    tasks = [
        {
            "task": t, "labels": [manifest.task_labels(t).start, manifest.task_labels(t).stop - 1],
            "classes": [manifest.class_names[g] for g in manifest.task_labels(t)],
            "train": manifest.num_samples("train", t), "test": manifest.num_samples("test", t),
            "shards": sum(len(manifest.task_shards(s, t)) for s in SPLITS),
        }
        for t in range(manifest.num_tasks())
    ]  # fmt: skip
    return {
        "benchmark": manifest.benchmark, "num_classes": len(manifest.class_names), "seed": manifest.seed,
        "resize": manifest.resize, "fingerprint": manifest.fingerprint, "verified_shards": verified, "tasks": tasks,
        "stored_classes": manifest.stored_names, "skipped": len(manifest.skipped), "missing": manifest.missing,
    }  # fmt: skip


def _class_index_line(names: list[str], shown: int = 40) -> str:
    """The stored class indices a run's ``data.class_order`` lists (the order and split above are the defaults)."""
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names[:shown]))
    more = f", ... ({len(names)} in all: manifest.json 'classes')" if len(names) > shown else ""
    return (
        "classes are grouped in shards: the order and split above are the defaults, a run chooses its own "
        f"(data.class_order_seed / class_order / tasks). Class indices: {listed}{more}"
    )
