"""Triton Inference Server model repository for an exported file (the onnxruntime backend).

Layout written (Triton's model repository convention)::

    DIR/<name>/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dynamic batching, input/output
    DIR/<name>/labels.txt       one class name per line (Triton's classification extension reads it)
    DIR/<name>/1/model.onnx     the exported, verified file

Names, dtypes and dims come from the ONNX graph itself, so they cannot disagree with the model. Dims exclude the
batch axis (Triton adds it when ``max_batch_size > 0``). The model folder is built beside its destination and
renamed into place; an existing folder of the same name is replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import ModelMetadata
from sdlora_dist.fileio import dir_mode

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


def _tensor_entry(value: onnx.ValueInfoProto, *, label_file: str | None = None) -> str:
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
        f"    dims: [ {', '.join(str(d) for d in dims[1:])} ]",
    ]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "\n".join(lines + ["  }"])


def triton_config(
    proto: onnx.ModelProto, name: str, *, max_batch_size: int, max_queue_delay_us: int = 500, labels: bool = True
) -> str:
    """``config.pbtxt`` text for a single-input, single-output classifier graph."""
    graph = proto.graph
    inputs = ",\n".join(_tensor_entry(v) for v in graph.input)
    outputs = ",\n".join(_tensor_entry(v, label_file="labels.txt" if labels else None) for v in graph.output)
    preferred = sorted({b for b in (8, 16, 32, 64) if b <= max_batch_size} | {max_batch_size})
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
    )


def write_triton_repo(
    onnx_path: str | Path, repo_dir: str | Path, *, model_name: str | None = None, max_batch_size: int = 64
) -> Path:
    """Write ``repo_dir/<model_name>/`` (config.pbtxt, labels.txt, 1/model.onnx) for ``onnx_path``; returns it.

    ``model_name`` defaults to the file's stem. ``max_batch_size`` bounds what Triton's dynamic batcher forms.
    """
    onnx_path, repo_dir = Path(onnx_path), Path(repo_dir)
    name = model_name or onnx_path.stem
    if not _NAME.match(name):
        raise UserError(f"Triton model name {name!r} must use only letters, digits, '_', '.', '-'")
    if max_batch_size <= 0:
        raise UserError(f"--triton-max-batch must be > 0 (got {max_batch_size})")
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist: export the model first")
    proto = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props, source=str(onnx_path))
    config = triton_config(proto, name, max_batch_size=max_batch_size)

    repo_dir.mkdir(parents=True, exist_ok=True)
    final = repo_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo_dir))
    old = None
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(config)
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in meta.class_names))
        os.chmod(tmp, dir_mode())  # mkdtemp made it 0700
        if final.exists():
            old = repo_dir / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old, final)  # put the previous repository back
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final
