"""Self-check of an exported file: onnx.checker, then onnxruntime against PyTorch on the same inputs.

Tolerances (max abs difference of logits):

* fp32: ``1e-4`` absolute. A timm ViT exported by torch.onnx differs from eager PyTorch by about 1e-7 to 1e-5.
* fp16: ``1e-2 * max(1, max |reference logit|)``, i.e. 1 % of the logit scale. Half precision has an 11-bit
  significand (relative step 2^-11 ~ 4.9e-4 per rounding); a ViT accumulates a few dozen roundings per logit, so
  errors of 1e-3 to 5e-3 of the logit scale are normal and 1e-2 leaves headroom without hiding a broken graph
  (a wrong weight or a missing adapter moves logits by O(1)).

Top-1 agreement is reported over all samples; a disagreement counts as a failure only where the reference's
top-1/top-2 margin exceeds twice the tolerance (a near-tie can legitimately flip within tolerance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

FP32_TOLERANCE = 1e-4
FP16_RELATIVE_TOLERANCE = 1e-2


def tolerance_for(precision: str, reference: np.ndarray) -> float:
    """The stated tolerance of ``precision`` for these reference logits (see the module docstring)."""
    if precision == "fp16":
        return FP16_RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    return FP32_TOLERANCE


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of comparing onnxruntime with PyTorch on one set of inputs."""

    name: str  # "random" or "images"
    num_samples: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    margin_disagreements: int  # top-1 disagreements where the reference margin exceeds 2 * tolerance

    @property
    def passed(self) -> bool:
        """True when within tolerance and no clear-margin top-1 disagreement."""
        return self.max_abs_diff <= self.tolerance and self.margin_disagreements == 0

    def summary(self) -> str:
        """One line for logs and error messages."""
        return (
            f"{self.name}: {self.num_samples} samples in batches {list(self.batch_sizes)}, max abs diff "
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), top-1 agreement {self.top1_agreement:.2%}"
        )


def check_graph(path: str | Path) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError)."""
    onnx.checker.check_model(str(path), full_check=True)


def compare_logits(
    name: str,
    run_onnx: Callable[[np.ndarray], np.ndarray],
    run_reference: Callable[[np.ndarray], np.ndarray],
    batches: Sequence[np.ndarray],
    *,
    precision: str,
    tolerance: float | None = None,
) -> VerifyReport:
    """Run both sides on every batch; ``tolerance`` overrides the stated one for ``precision``."""
    got = np.concatenate([run_onnx(b) for b in batches]).astype(np.float64)
    ref = np.concatenate([run_reference(b) for b in batches]).astype(np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
    tol = tolerance_for(precision, ref) if tolerance is None else tolerance
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    if not np.isfinite(got).all():
        diff = float("inf")
    agree = got.argmax(1) == ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    return VerifyReport(
        name=name,
        num_samples=len(ref),
        batch_sizes=tuple(len(b) for b in batches),
        max_abs_diff=diff,
        top1_agreement=float(agree.mean()) if len(agree) else 1.0,
        tolerance=tol,
        margin_disagreements=int((~agree & clear).sum()),
    )


def random_batches(
    input_shape_chw: tuple[int, int, int],
    *,
    uint8_nhwc: bool,
    batch_sizes: Sequence[int] = (1, 3, 8),
    seed: int = 0,
) -> list[np.ndarray]:
    """Fixed random inputs, one array per batch size (exercises the dynamic batch axis).

    Float inputs are standard normal NCHW (a harsher range than normalised photos); uint8 inputs are uniform NHWC.
    """
    rng = np.random.default_rng(seed)
    c, h, w = input_shape_chw
    if uint8_nhwc:
        return [rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8) for n in batch_sizes]
    return [rng.standard_normal((n, c, h, w)).astype(np.float32) for n in batch_sizes]


def split_batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut an (N, ...) array into consecutive batches."""
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
