"""Atomic file writes: temp file (or folder) in the same directory, then a rename.

A killed process never leaves a half-written file that a later run would read. Used by the checkpoints, the run
directory, the shard manifest, the report and the ONNX export. ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700
whatever the umask (their security guarantee for shared /tmp); the renamed result here is an ordinary file or
folder, so its mode is set to what ``open``/``mkdir`` would have given under the current umask (0644/0755 under
umask 022), or colleagues and a serving process on a shared filesystem could not read it. The same holds for
what a writer puts into an atomic folder: safetensors' ``save_file`` also creates its files 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a new regular file gets under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode a new folder gets under the current umask."""
    return 0o777 & ~current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for the caller to write; on success it becomes ``path`` (umask mode).

    On any exception the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: str | Path, data: Any) -> None:
    """JSON variant of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _chmod_tree(root: Path) -> None:
    """Give ``root`` and everything in it the modes ``open``/``mkdir`` would give under the current umask."""
    files, folders = file_mode(), dir_mode()
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, folders if path.is_dir() else files)
    os.chmod(root, folders)


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Create ``final`` by filling a temp sibling folder and renaming it; replaces an existing ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        _chmod_tree(tmp)
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (torch-free: serving hosts and Triton publishing use it)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
