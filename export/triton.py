"""Triton Inference Server model repository for an exported file (the onnxruntime backend).

Layout written (Triton's model repository convention)::

    DIR/<name>/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dynamic batching, input/output,
                                version_policy (latest 1, or specific [v] after a rollback)
    DIR/<name>/labels.txt       one class name per line (Triton's classification extension reads it)
    DIR/<name>/<v>/model.onnx   one numbered version per published model: 1, 2, 3, ...

Each publish adds the next version and never touches an existing one (publishing a file that is already a version
only refreshes the config). A class-incremental model's classes extend its predecessor's, so ``labels.txt`` holds the
newest version's names and stays right for every earlier one (label i is the same class in all). Versions with
different class counts get a variable ``logits`` width (``dims: [ -1 ]``), so one config is valid for all of them.

Rollback (:func:`rollback`) rewrites only ``version_policy`` to ``specific: { versions: [ v ] }``: Triton (with
``--model-control-mode=poll``, or on an explicit load request) then serves version v, no file is copied or deleted,
version numbers keep meaning "the order models were published", and ``rollback --latest`` (or the next publish)
returns to serving the newest version. Names, dtypes and dims come from the ONNX graph itself. Every file is written
to a temp name and renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import read_metadata
from sdlora_dist.fileio import atomic_write_text, dir_mode, file_sha256

# ONNX TensorProto element type -> Triton data_type.
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _tensor_entry(value: onnx.ValueInfoProto, *, label_file: str | None = None, variable: bool = False) -> str:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _TRITON_TYPES:
        raise ValueError(f"{value.name}: ONNX element type {tensor.elem_type} has no Triton equivalent here")
    dims = [d.dim_value for d in tensor.shape.dim]
    if not dims or tensor.shape.dim[0].dim_value != 0 or any(d <= 0 for d in dims[1:]):
        raise ValueError(f"{value.name}: expected a dynamic batch axis then fixed dims, got {tensor.shape}")
    lines = [
        "  {",
        f'    name: "{value.name}"',
        f"    data_type: {_TRITON_TYPES[tensor.elem_type]}",
        f"    dims: [ {', '.join('-1' if variable else str(d) for d in dims[1:])} ]",
    ]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "\n".join(lines + ["  }"])


LATEST = "latest: { num_versions: 1 }"


@dataclass(frozen=True)
class Published:
    """Where a publish put the model: the model folder and the version it serves the file as."""

    folder: Path
    version: int
    new: bool  # False: the file was already this version; only the config was refreshed


def triton_config(
    proto: onnx.ModelProto,
    name: str,
    *,
    max_batch_size: int,
    max_queue_delay_us: int = 500,
    labels: bool = True,
    policy: str = LATEST,
    variable_classes: bool = False,
) -> str:
    """``config.pbtxt`` text for a single-input, single-output classifier graph.

    ``policy``: the ``version_policy`` body; ``variable_classes``: ``logits`` width -1 (versions differ in classes).
    """
    graph = proto.graph
    inputs = ",\n".join(_tensor_entry(v) for v in graph.input)
    outputs = ",\n".join(
        _tensor_entry(v, label_file="labels.txt" if labels else None, variable=variable_classes) for v in graph.output
    )
    preferred = sorted({b for b in (8, 16, 32, 64) if b <= max_batch_size} | {max_batch_size})
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"version_policy: {{ {policy} }}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
    )


def versions(folder: Path) -> list[int]:
    """Published version numbers of a model folder, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file())


def _class_names(onnx_path: Path) -> tuple[str, ...]:
    return read_metadata(onnx_path).class_names


def _check_name(name: str, max_batch_size: int) -> None:
    if not _NAME.match(name):
        raise UserError(f"Triton model name {name!r} must use only letters, digits, '_', '.', '-'")
    if max_batch_size <= 0:
        raise UserError(f"--triton-max-batch must be > 0 (got {max_batch_size})")


def _check_classes(folder: Path, names: tuple[str, ...], onnx_path: Path) -> None:
    """Every published version must share label indices: each one's classes extend (or equal) the ones before."""
    for v in versions(folder):
        old = _class_names(folder / str(v) / "model.onnx")
        short, long = (old, names) if len(old) <= len(names) else (names, old)
        if tuple(long[: len(short)]) != tuple(short):
            raise UserError(
                f"{onnx_path} does not continue the classes of {folder}/{v} (label order differs from "
                f"{list(old[:3])}...): publish it under another --triton-name"
            )


def _write_config(folder: Path, name: str, max_batch_size: int, policy: str) -> None:
    """config.pbtxt and labels.txt from the newest version (the widest class list)."""
    published = versions(folder)
    newest = onnx.load(str(folder / str(published[-1]) / "model.onnx"))
    widths = {len(_class_names(folder / str(v) / "model.onnx")) for v in published}
    config = triton_config(
        newest, name, max_batch_size=max_batch_size, policy=policy, variable_classes=len(widths) > 1
    )
    atomic_write_text(
        folder / "labels.txt", "".join(f"{c}\n" for c in _class_names(folder / str(published[-1]) / "model.onnx"))
    )
    atomic_write_text(folder / "config.pbtxt", config)


def _add_version(folder: Path, onnx_path: Path) -> int:
    """Copy the file in as the next version (built beside it, renamed into place; an existing one is never touched)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, dir_mode())
    version = (versions(folder) or [0])[-1] + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=folder))
    try:
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        os.chmod(tmp, dir_mode())  # mkdtemp made it 0700
        os.rename(tmp, folder / str(version))  # fails if the version appeared meanwhile: never overwritten
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def publish_triton(
    onnx_path: str | Path, repo_dir: str | Path, *, model_name: str | None = None, max_batch_size: int = 64
) -> Published:
    """Publish ``onnx_path`` as the next version of ``repo_dir/<model_name>`` and serve the newest version.

    ``model_name`` defaults to the file's stem; a file already published there (same sha256) keeps its version.
    """
    onnx_path, repo_dir = Path(onnx_path), Path(repo_dir)
    name = model_name or onnx_path.stem
    _check_name(name, max_batch_size)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist: export the model first")
    folder = repo_dir / name
    names = _class_names(onnx_path)
    _check_classes(folder, names, onnx_path)
    digest = file_sha256(onnx_path)
    same = [v for v in versions(folder) if file_sha256(folder / str(v) / "model.onnx") == digest]
    version = same[0] if same else _add_version(folder, onnx_path)
    _write_config(folder, name, max_batch_size, LATEST)
    return Published(folder, version, not same)


def write_triton_repo(
    onnx_path: str | Path, repo_dir: str | Path, *, model_name: str | None = None, max_batch_size: int = 64
) -> Path:
    """Publish ``onnx_path`` into ``repo_dir/<model_name>/`` (see :func:`publish_triton`); returns the model folder."""
    return publish_triton(onnx_path, repo_dir, model_name=model_name, max_batch_size=max_batch_size).folder


def rollback(repo_dir: str | Path, model_name: str, version: int | None) -> int:
    """Serve ``version`` of ``repo_dir/<model_name>`` (None: the newest again); returns the version now served."""
    folder = Path(repo_dir) / model_name
    published = versions(folder)
    if not published:
        raise UserError(f"{folder} holds no published version: publish one with 'sdlora publish MODEL.onnx --triton'")
    if version is not None and version not in published:
        raise UserError(f"version {version} of {folder} does not exist: published versions are {published}")
    match = re.search(r"max_batch_size:\s*(\d+)", (folder / "config.pbtxt").read_text())
    max_batch = int(match.group(1)) if match else 64
    policy = LATEST if version is None else f"specific: {{ versions: [ {version} ] }}"
    _write_config(folder, model_name, max_batch, policy)
    return published[-1] if version is None else version
