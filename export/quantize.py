"""``sdlora export --int8``: an INT8 copy of the exported ONNX model for CPU serving, verified before it is kept.

onnxruntime's dynamic quantization (weights INT8 per tensor, activations quantized at run time): no calibration set
to choose, and on a ViT nearly all the compute is MatMul/Gemm, which it covers. The copy is written beside the fp32
file as ``<stem>.int8.onnx`` only when its top-1 prediction agrees with the fp32 model's on at least
``INT8_MIN_AGREEMENT`` of the run's real test images; otherwise nothing is written and the command fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_path

INT8_MIN_AGREEMENT = 0.97  # top-1 agreement with fp32 over the test images; measured in BENCHMARKS.md


@dataclass(frozen=True)
class Int8Report:
    """The INT8 file and how it compared with the fp32 one."""

    path: Path
    fp32_bytes: int
    int8_bytes: int
    images: int
    agreement: float

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"wrote {self.path} (INT8 dynamic, {self.int8_bytes / 2**20:.1f} MiB = "
            f"{self.int8_bytes / self.fp32_bytes:.2f} x fp32): top-1 agrees with fp32 on {100 * self.agreement:.1f}% "
            f"of {self.images} real test images (required {100 * INT8_MIN_AGREEMENT:.0f}%)"
        )


def int8_path(fp32_path: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")


def top1_agreement(fp32_path: Path, int8_file: Path, images: np.ndarray, batch: int = 64) -> float:
    """Share of ``images`` (uint8 NHWC crops) on which both models predict the same class."""
    from sdlora_dist.export.inference import OnnxClassifier

    a, b = OnnxClassifier(fp32_path, provider="cpu"), OnnxClassifier(int8_file, provider="cpu")
    same = sum(int((a.logits(images[i : i + batch]).argmax(1) == b.logits(images[i : i + batch]).argmax(1)).sum())
               for i in range(0, len(images), batch))  # fmt: skip
    return same / len(images)


def quantize_int8(fp32_path: str | Path, images: np.ndarray) -> Int8Report:
    """Quantize ``fp32_path`` and keep the result only if it agrees with it on ``images`` (UserError otherwise)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = Path(fp32_path)
    if len(images) == 0:
        raise UserError("--int8 needs the run's test shards to verify the INT8 model: make them readable at the "
                        "path the run was trained on, or export without --int8")  # fmt: skip
    out = int8_path(fp32_path)
    with atomic_path(out) as tmp:
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
        agreement = top1_agreement(fp32_path, tmp, images)
        if agreement < INT8_MIN_AGREEMENT:
            raise UserError(
                f"the INT8 model agrees with fp32 on only {100 * agreement:.1f}% of {len(images)} test images "
                f"(required {100 * INT8_MIN_AGREEMENT:.0f}%): nothing written; serve the fp32 file {fp32_path}"
            )
        size = tmp.stat().st_size
    return Int8Report(out, fp32_path.stat().st_size, size, len(images), agreement)
