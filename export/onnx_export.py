"""Export a merged plain timm ViT to one self-verified ONNX file.

Exporter choice: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). Both exporters give the same
numbers on a timm ViT (max diff ~1e-7), but on the same 2-block ViT the TorchScript exporter (``dynamo=False``)
emits 185 nodes, 51 of them ``Constant`` and 14 ``Identity``, plus shape arithmetic (Gather/Unsqueeze/Equal/Where)
around the batch dimension, tracer warnings about Python booleans inside timm's attention, and a deprecation
warning (it is the legacy path since torch 2.9). The dynamo exporter emits 93 nodes with no Constant/Identity
clutter, the batch as a symbolic ``batch`` dim on input and output, and is the maintained path. It costs ~2-3 s
per export instead of ~0.3 s, which is nothing next to the verification.

The file is written to a temp name beside the destination, checked (onnx.checker), verified with onnxruntime
against PyTorch, and only then renamed into place: a failed or interrupted export leaves no output file and never
replaces an existing one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from sdlora_dist.errors import UserError
from sdlora_dist.export.inference import open_session, resolve_providers
from sdlora_dist.export.metadata import LAYOUT_FLOAT, LAYOUT_UINT8, ModelMetadata
from sdlora_dist.export.preprocess import InGraphNormalize, normalize
from sdlora_dist.export.verify import VerifyReport, check_graph, compare_logits, random_batches, split_batches
from sdlora_dist.fileio import atomic_path

INPUT_FLOAT = "pixel_values"  # float32 (batch, 3, H, W), normalised
INPUT_UINT8 = "image"  # uint8 (batch, H, W, 3), raw pixels (--with-preprocessing)
OUTPUT = "logits"  # float32 (batch, num_classes)
MIN_OPSET, MAX_OPSET = 17, 23
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ExportReport:
    """What was written and how it verified."""

    path: Path
    opset: int
    precision: str
    input_name: str
    input_layout: str
    output_name: str
    num_nodes: int
    file_bytes: int
    checks: tuple[VerifyReport, ...]
    seconds: float

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        head = (
            f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, {self.precision}, opset {self.opset}, "
            f"{self.num_nodes} nodes, input {self.input_name} {self.input_layout}) in {self.seconds:.1f} s"
        )
        return "\n".join([head] + [f"verified {c.summary()}" for c in self.checks])


class _HalfPrecision(nn.Module):
    """fp16 weights and compute; fp32 in and out, so clients and the verification feed the same arrays."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float16)).to(torch.float32)


def _check_plain_vit(model: nn.Module) -> None:
    """The export sees only a plain timm ViT (``SDLoRAViT.merge()`` output), never adapter modules."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        hint = " (call .merge() on the SD-LoRA model first)" if hasattr(model, "merge") else ""
        raise TypeError(f"export_onnx expects a plain timm VisionTransformer, got {type(model).__name__}{hint}")
    foreign = sorted(
        {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith(("torch.", "timm."))}
    )
    if foreign:
        raise TypeError(f"export_onnx expects a plain timm ViT; it holds non-timm modules {foreign}: merge first")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs progress, opset conversion notes and warnings; keep the CLI output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=False):
            lg.setLevel(level)


def _to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _set_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    # Keep any props the exporter wrote, replace ours.
    keep = [p for p in proto.metadata_props if not p.key.startswith("sdlora.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    # The dynamo exporter annotates every node with stack traces (local source paths) and FX names: debugging
    # aids that double the file of a small model and leak the build machine's paths. Serving needs none of them.
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        del value.metadata_props[:]
    proto.producer_name = "sdlora-dist"
    proto.producer_version = meta.package_version
    proto.doc_string = f"SD-LoRA merged ViT, {meta.num_classes} classes after {meta.num_tasks} tasks"


def _reference(model: nn.Module, meta: ModelMetadata) -> Any:
    """PyTorch fp32 logits for the arrays the exported file takes (uint8 goes through the numpy normalisation)."""

    def run(batch: np.ndarray) -> np.ndarray:
        x = normalize(batch, meta.mean, meta.std) if meta.input_layout == LAYOUT_UINT8 else batch
        with torch.no_grad():
            return model(torch.from_numpy(x)).float().numpy()

    return run


def _verify(
    tmp: Path,
    model: nn.Module,
    meta: ModelMetadata,
    verify_inputs: np.ndarray | None,
    tolerance: float | None,
) -> tuple[VerifyReport, ...]:
    check_graph(tmp)
    # fp32 verifies on CPU (deterministic, no TF32); fp16 on the serving provider (CUDA when installed).
    providers = resolve_providers(None if meta.precision == "fp16" else "cpu")
    session = open_session(tmp, providers)
    name = session.get_inputs()[0].name

    def run_onnx(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT], {name: batch})[0]

    reference = _reference(model, meta)
    uint8 = meta.input_layout == LAYOUT_UINT8
    batches = random_batches(meta.input_size, uint8_nhwc=uint8)
    reports = [compare_logits("random", run_onnx, reference, batches, precision=meta.precision, tolerance=tolerance)]
    if verify_inputs is not None and len(verify_inputs):
        images = verify_inputs if uint8 else normalize(verify_inputs, meta.mean, meta.std)
        reports.append(
            compare_logits(
                "images", run_onnx, reference, split_batches(images, 16), precision=meta.precision, tolerance=tolerance
            )
        )
    return tuple(reports)


def _frozen_copy(module: nn.Module) -> nn.Module:
    # A copy in eval mode, fp32 on CPU: the caller's module keeps its mode, device and dtype.
    return copy.deepcopy(module).float().cpu().eval()


def _check_verify_inputs(verify_inputs: np.ndarray | None, meta: ModelMetadata) -> None:
    if verify_inputs is None:
        return
    want = (*meta.image_hw, 3)
    if verify_inputs.dtype != np.uint8 or verify_inputs.ndim != 4 or tuple(verify_inputs.shape[1:]) != want:
        raise ValueError(
            f"verify_inputs must be uint8 (N, {want[0]}, {want[1]}, 3), got {verify_inputs.dtype} "
            f"{verify_inputs.shape}"
        )


def _prepare_metadata(
    model: nn.Module, metadata: Mapping[str, Any], *, opset: int, fp16: bool, with_preprocessing: bool
) -> ModelMetadata:
    """Check the model and options; the metadata with input layout and precision filled in."""
    _check_plain_vit(model)
    if not (MIN_OPSET <= opset <= MAX_OPSET):
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (got {opset})")
    meta = ModelMetadata.from_dict(metadata).replace(
        input_layout=LAYOUT_UINT8 if with_preprocessing else LAYOUT_FLOAT, precision="fp16" if fp16 else "fp32"
    )
    if model.num_classes != meta.num_classes:
        raise ValueError(f"the model has {model.num_classes} outputs, metadata lists {meta.num_classes} class names")
    return meta


def _check_out_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory: give a file name such as {out_path / 'model.onnx'}")
    return out_path


def _trace(model: nn.Module, meta: ModelMetadata, opset: int) -> tuple[nn.Module, onnx.ModelProto]:
    """(fp32 CPU eval copy of ``model``, the exported graph with our metadata); ``model`` keeps its mode."""
    uint8 = meta.input_layout == LAYOUT_UINT8
    was_training = model.training
    model.eval()
    try:
        plain = copy.deepcopy(model).float().cpu()
        module: nn.Module = copy.deepcopy(plain)
        if meta.precision == "fp16":
            module = _HalfPrecision(module)
        if uint8:
            module = InGraphNormalize(module, meta.mean, meta.std)
        example = random_batches(meta.input_size, uint8_nhwc=uint8, batch_sizes=(2,))[0]
        proto = _to_onnx(module.eval(), torch.from_numpy(example), INPUT_UINT8 if uint8 else INPUT_FLOAT, opset)
    finally:
        model.train(was_training)
    _set_metadata(proto, meta)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise UserError(
            f"the model serialises to {proto.ByteSize() / 2**30:.1f} GiB, over ONNX's 2 GiB single-file "
            "limit: use --fp16 or a smaller backbone"
        )
    return plain, proto


def _write_verified(
    proto: onnx.ModelProto,
    out_path: Path,
    reference: nn.Module,
    meta: ModelMetadata,
    verify_inputs: np.ndarray | None,
    tolerance: float | None,
) -> tuple[VerifyReport, ...]:
    """Save to a temp file beside ``out_path``, verify it, and only then rename it into place."""
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, str(tmp))
        checks = _verify(tmp, reference, meta, verify_inputs, tolerance)
        failed = [c for c in checks if not c.passed]
        if failed:
            raise UserError(
                f"export verification failed, {out_path} not written: "
                + "; ".join(c.summary() + f", {c.margin_disagreements} clear-margin top-1 flips" for c in failed)
            )
    return checks


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    *,
    metadata: Mapping[str, Any],
    opset: int = 17,
    fp16: bool = False,
    with_preprocessing: bool = False,
    verify_inputs: np.ndarray | None = None,
    tolerance: float | None = None,
    reference: nn.Module | None = None,
) -> ExportReport:
    """Export ``model`` (a plain timm ViT, e.g. ``SDLoRAViT.merge()``) to ``out_path`` and verify it.

    ``metadata``: class_names, mean, std, input_size (3, H, W), interpolation, crop_pct, num_tasks, config_hash
    (see ``metadata_from_pretrained_cfg``); the package version, input layout and precision are added here.
    ``with_preprocessing``: the graph takes uint8 (batch, H, W, 3) and normalises inside. ``fp16``: half-precision
    weights and compute, fp32 input/output. ``verify_inputs``: real images as uint8 (N, H, W, 3) crops at the input
    size, checked in addition to fixed random inputs at batch sizes 1, 3 and 8. ``tolerance`` overrides the stated
    one (``verify.py``). ``reference``: the PyTorch model the file must reproduce, default ``model``; pass the
    unmerged SD-LoRA model so the check covers the merge too. Past tolerance -> UserError and no file written (an
    existing file is kept).
    """
    start = time.perf_counter()
    meta = _prepare_metadata(model, metadata, opset=opset, fp16=fp16, with_preprocessing=with_preprocessing)
    _check_verify_inputs(verify_inputs, meta)
    out_path = _check_out_path(out_path)
    plain, proto = _trace(model, meta, opset)
    checks = _write_verified(
        proto, out_path, _frozen_copy(reference) if reference is not None else plain, meta, verify_inputs, tolerance
    )
    return ExportReport(
        path=out_path,
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset),
        precision=meta.precision,
        input_name=INPUT_UINT8 if with_preprocessing else INPUT_FLOAT,
        input_layout=meta.input_layout,
        output_name=OUTPUT,
        num_nodes=len(proto.graph.node),
        file_bytes=out_path.stat().st_size,
        checks=checks,
        seconds=time.perf_counter() - start,
    )


def onnx_node_count(path: str | Path) -> int:
    """Nodes in the main graph of an ONNX file."""
    return len(onnx.load(str(path), load_external_data=False).graph.node)
