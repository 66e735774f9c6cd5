"""``manifest.json``: the index of a shard set (classes, class order, tasks, shards with counts and sha256).

Schema (``format`` 2, class-grouped: the class order and task split are chosen at train time)::

    {"format": 2, "benchmark": "digits", "fingerprint": "...", "classes": [...],   # the stored class index = position
     "class_shards": {"train": [[{"path": "train/class_0003/shard-000000.tar", "count": 2, "bytes": 20480,
                                  "sha256": "...", "offsets": [0, 7168, 14336]}]], "test": [[...]]},
                                      # class_shards[split][c] = the shards of stored class c; a sample's .cls is c;
                                      # offsets: where each sample's tar header starts, then where the data ends
     "class_order": [...], "classes_per_task": [...],   # the default order (stored indices) and split
     "seed": 1993, "split_seed": 0, "resize": 256, "shard_size": 1000,
     "skipped": [{"path": "...", "reason": "..."}],   # source files that could not be read at prepare time
     "missing": 0,                    # listed source images absent at prepare time (allowed by --max-missing)
     "prepare_args": {"benchmark": "digits", "root": null, "tasks": 5, ...},  # rebuilds the prepare command
     "added_tasks": [{"task": 5, "classes": [10, 11], "root": "...", "fingerprint": "..."}]}

Loaded, a manifest is shown through its default order and split (``class_names``, ``class_order``,
``classes_per_task``, ``shards`` per task, ``label_map`` stored -> global label); ``data.classes.task_view`` gives the
view of another order and split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora_dist.data import urls
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_write_text, file_sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
SPLITS = ("train", "test")


@dataclass
class ShardInfo:
    """One tar file of a task's split: its path relative to the shard directory, sample count, size and sha256.

    ``offsets``: the byte offset of each sample's first tar header, then the end of the last sample's data
    (``count + 1`` numbers), so a stream can open a shard at any sample with one seek or ranged GET
    (``data.byteranges``); None in shard sets written before they were recorded (read forward from byte 0).
    """

    path: str
    count: int
    bytes: int
    sha256: str
    offsets: list[int] | None = None


@dataclass
class Manifest:
    """A shard set as described by ``DIR/manifest.json``."""

    benchmark: str
    class_names: list[str]
    classes_per_task: list[int]
    seed: int
    class_order: list[int]
    shards: dict[str, list[list[ShardInfo]]]
    fingerprint: str
    resize: int = 256
    shard_size: int = 1000
    split_seed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    added_tasks: list[dict[str, Any]] = field(default_factory=list)
    missing: int = 0
    prepare_args: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    # the stored classes and their shards, the default order and split (the fields above are the view's)
    stored_names: list[str] | None = None
    class_shards: dict[str, list[list[ShardInfo]]] | None = None
    default_order: list[int] | None = None
    default_split: list[int] | None = None
    label_map: list[int] | None = None  # stored label -> global label of this view (None: stored labels are global)

    def num_tasks(self) -> int:
        """Number of tasks in the shard set."""
        return len(self.classes_per_task)

    def class_offset(self, task: int) -> int:
        """First global label owned by ``task`` (task t owns [offset, offset + classes_per_task[t]))."""
        self._check_task(task)
        return sum(self.classes_per_task[:task])

    def task_labels(self, task: int) -> range:
        """Global labels owned by ``task``."""
        start = self.class_offset(task)
        return range(start, start + self.classes_per_task[task])

    def task_shards(self, split: str, task: int) -> list[ShardInfo]:
        """The shards of one task's split, in written order: the one place the loaders get a task's shards from."""
        if split not in self.shards:
            raise UserError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}")
        self._check_task(task)
        return self.shards[split][task]

    def num_samples(self, split: str, task: int) -> int:
        """Samples of ``task`` in ``split`` (sum of its shards' counts)."""
        return sum(s.count for s in self.task_shards(split, task))

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks():
            raise UserError(f"task {task} does not exist: the shard set has tasks 0..{self.num_tasks() - 1}")

    def all_shards(self) -> list[list[ShardInfo]]:
        """Every stored shard exactly once, as the lists the file holds (per class)."""
        return [shards for split in SPLITS for shards in self.class_shards[split]]

    def to_json(self) -> str:
        """Serialise (stable key order); a view is written as its stored classes, never as the view."""
        data = dataclasses.asdict(self)
        view_only = ("stored_names", "class_shards", "default_order", "default_split", "label_map")
        data = {k: v for k, v in data.items() if k not in (*view_only, "class_names", "shards")}
        data.update(classes=self.stored_names, class_shards=dataclasses.asdict(self)["class_shards"],
                    class_order=self.default_order, classes_per_task=self.default_split)  # fmt: skip
        # each shard's offsets on one line: indented one number per line, they would take 2-3x the bytes
        compact = []
        for shard in (s for split in data["class_shards"].values() for c in split for s in c):
            if shard.get("offsets") is not None:
                compact.append(json.dumps(shard["offsets"], separators=(",", ":")))
                shard["offsets"] = f"\0offsets{len(compact) - 1}\0"
        text = json.dumps(data, indent=1, sort_keys=True)
        text = re.sub(r'"\\u0000offsets(\d+)\\u0000"', lambda m: compact[int(m[1])], text)
        return text + "\n"


def _class_grouped(raw: dict[str, Any]) -> Manifest:
    """A manifest, shown through its default order and split."""
    names = list(raw["classes"])
    class_shards = {split: [[ShardInfo(**s) for s in c] for c in raw["class_shards"][split]] for split in SPLITS}
    if any(len(class_shards[split]) != len(names) for split in SPLITS):
        raise ValueError("the class shard lists do not have one entry per class")
    for shard in (s for split in SPLITS for c in class_shards[split] for s in c):
        _check_offsets(shard)
    order, per_task = list(raw["class_order"]), list(raw["classes_per_task"])
    if sorted(order) != list(range(len(names))) or sum(per_task) != len(names):
        raise ValueError("classes, class_order and classes_per_task disagree")
    skip = ("shards", "class_names", "class_order", "classes_per_task", "stored_names", "class_shards", "label_map")
    kwargs = {f.name: raw[f.name] for f in dataclasses.fields(Manifest) if f.name in raw and f.name not in skip}
    offsets = [sum(per_task[:t]) for t in range(len(per_task) + 1)]
    shards = {split: [[s for c in order[offsets[t] : offsets[t + 1]] for s in class_shards[split][c]]
                      for t in range(len(per_task))] for split in SPLITS}  # fmt: skip
    label_map = [0] * len(names)
    for g, c in enumerate(order):
        label_map[c] = g
    return Manifest(class_names=[names[c] for c in order], class_order=order, classes_per_task=per_task,
                    shards=shards, stored_names=names, class_shards=class_shards, default_order=list(order),
                    default_split=list(per_task), label_map=label_map, **kwargs)  # fmt: skip


def _check_offsets(shard: ShardInfo) -> None:
    """ValueError unless ``shard.offsets`` (when present) holds count + 1 ascending offsets within the file."""
    offsets = shard.offsets
    if offsets is None:
        return
    ascending = all(isinstance(o, int) and 0 <= o for o in offsets) and offsets == sorted(offsets)
    if len(offsets) != shard.count + 1 or not ascending or offsets[-1] > shard.bytes:
        raise ValueError(f"{shard.path}: offsets must be {shard.count + 1} ascending byte offsets within the shard")


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON; raises KeyError/TypeError/ValueError on a malformed one."""
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"unsupported manifest format {raw.get('format')!r} (this version reads {MANIFEST_FORMAT})")
    return _class_grouped(raw)


def load_manifest(shards_dir: str | Path) -> Manifest:
    """Read ``manifest.json`` of a shard set: a local folder or a URL (``urls`` lists the forms); UserError when it
    is missing or corrupt."""
    if urls.is_local(shards_dir):
        path = urls.local_path(shards_dir) / MANIFEST_NAME
        if not path.is_file():
            raise UserError(
                f"no {MANIFEST_NAME} in {shards_dir}: it is not a shard set; create one with 'sdlora data prepare'"
            )
        text, where = path.read_text(), str(path)
    else:
        where = urls.join(shards_dir, MANIFEST_NAME)
        try:
            text = urls.read_bytes(where).decode()
        except UserError as exc:  # keeps its class: a server that is down is not a wrong URL
            raise type(exc)(f"no readable {MANIFEST_NAME} at {shards_dir}: {exc}") from exc
    try:
        return manifest_from_dict(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{where} is corrupt ({type(exc).__name__}: {exc}); re-create the shard set with 'sdlora data prepare'"
        ) from exc


def write_manifest(manifest: Manifest, shards_dir: str | Path) -> None:
    """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
    atomic_write_text(Path(shards_dir) / MANIFEST_NAME, manifest.to_json())


def prepare_command(manifest: Manifest, shards_dir: str | Path) -> str:
    """The ``sdlora data prepare`` command that re-creates (or repairs) this shard set, ready to paste in a shell."""
    args = manifest.prepare_args
    # a set written before the arguments were recorded: the root is a placeholder (digits needs none)
    root = args.get("root") or ("DATASET_FOLDER" if "root" not in args and manifest.benchmark != "digits" else None)
    tasks = args.get("tasks", manifest.num_tasks() - len(manifest.added_tasks))
    return command_from_args({**args, "benchmark": manifest.benchmark, "root": root, "tasks": tasks,
                              "seed": manifest.seed, "resize": manifest.resize, "shard_size": manifest.shard_size},
                             shards_dir)  # fmt: skip


def command_from_args(args: dict[str, Any], out: str | Path) -> str:
    """The ``sdlora data prepare`` command of the recorded options ``args`` (a prepare's ``prepare_args``)."""
    argv = ["sdlora", "data", "prepare", "--benchmark", str(args["benchmark"])]
    if args.get("root"):
        argv += ["--root", str(args["root"])]
    argv += ["--out", str(out)]
    flags = {"tasks": "--tasks", "seed": "--seed", "resize": "--resize", "shard_size": "--shard-size",
             "split_seed": "--split-seed", "max_missing": "--max-missing"}  # fmt: skip
    for key, flag in flags.items():
        if args.get(key) is not None and (key not in ("split_seed", "max_missing") or args[key]):
            argv += [flag, str(args[key])]
    if args.get("subset"):
        argv.append("--subset")
    return shlex.join(argv)


def damaged_shards(manifest: Manifest, shards_dir: str | Path) -> tuple[int, list[tuple[ShardInfo, str]]]:
    """Check every shard's existence, size and sha256; returns (shards checked, [(shard, problem)])."""
    damaged = []
    checked = 0
    for shards in manifest.all_shards():
        for shard in shards:
            if urls.is_local(shards_dir):
                problem = _shard_problem(urls.local_path(shards_dir) / shard.path, shard, check_sha=True)
            else:
                problem = _remote_problem(urls.join(shards_dir, shard.path), shard)
            checked += 1
            if problem:
                damaged.append((shard, problem))
    return checked, damaged


def verify_shards(manifest: Manifest, shards_dir: str | Path) -> int:
    """Check every shard's existence, size and sha256 against the manifest; returns the number checked.

    Raises UserError naming every shard that is missing, truncated or whose checksum differs, and the exact
    ``sdlora data prepare`` command that rewrites them.
    """
    checked, damaged = damaged_shards(manifest, shards_dir)
    if damaged:
        problems = [f"{shard.path} ({problem})" for shard, problem in damaged]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(
            f"{len(problems)} shard(s) in {shards_dir} fail verification: {shown}; rewrite them with: "
            f"{prepare_command(manifest, shards_dir)}"
        )
    return checked


def _shard_problem(path: Path, shard: ShardInfo, check_sha: bool) -> str | None:
    """Why a shard file is unusable (missing, wrong size, checksum), or None when it matches the manifest."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"truncated or altered: {size} bytes, manifest says {shard.bytes}"
    if check_sha and file_sha256(path) != shard.sha256:
        return "sha256 mismatch"
    return None


def _remote_problem(url: str, shard: ShardInfo) -> str | None:
    """Stream a remote shard once: its size and sha256 against the manifest (read errors retried, then raised)."""
    size, digest = urls.with_retries(url, lambda: stream_sha256(url))
    if size != shard.bytes:
        return f"truncated or altered: {size} bytes, manifest says {shard.bytes}"
    return None if digest == shard.sha256 else "sha256 mismatch"


def stream_sha256(url: str, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of ``url`` read once as a stream."""
    digest, size = hashlib.sha256(), 0
    stream = urls.open_stream(url)
    try:
        while block := stream.read(chunk):
            digest.update(block)
            size += len(block)
    finally:
        stream.close()
    return size, digest.hexdigest()


def shard_problem(shards_dir: str | Path, shard: ShardInfo) -> str | None:
    """Cheap check (existence and size, no hashing) of a local shard before it is opened; None for a URL (no HEAD
    request: a remote shard's problems surface while it streams)."""
    if not urls.is_local(shards_dir):
        return None
    return _shard_problem(urls.local_path(shards_dir) / shard.path, shard, check_sha=False)
