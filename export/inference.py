"""onnxruntime serving of an exported model: provider choice, a classifier session, file prediction, evaluation.

Nothing here imports torch: a serving host needs onnxruntime, numpy and Pillow only (``evaluate`` on shards reads
them through the data pipeline and is the exception).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdlora_dist.errors import UserError
from sdlora_dist.export.metadata import LAYOUT_UINT8, ModelMetadata
from sdlora_dist.export.preprocess import image_to_uint8, normalize
from sdlora_dist.logs import log_rank_zero

# --provider name -> onnxruntime execution providers, in priority order (CPU always last as the fallback).
PROVIDERS: dict[str, list[str]] = {
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}


def resolve_providers(requested: str | None = None, available: Sequence[str] | None = None) -> list[str]:
    """Execution providers for ``requested`` (cuda | tensorrt | cpu | None = automatic).

    Automatic picks CUDA when the installed onnxruntime has it, else CPU. TensorRT is opt-in (``tensorrt``): it
    builds an engine when the session starts, which takes minutes for a ViT. A named provider the installed
    onnxruntime lacks is a UserError listing what is installed; an unknown name lists the valid ones.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if requested is None:
        requested = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    key = requested.lower()
    if key not in PROVIDERS:
        raise UserError(f"unknown provider {requested!r}: valid are {', '.join(PROVIDERS)} (or omit it for automatic)")
    wanted = PROVIDERS[key][0]
    if wanted not in available:
        hint = " (install onnxruntime-gpu: pip install -e '.[gpu]')" if key != "cpu" else ""
        raise UserError(
            f"provider {requested!r} needs {wanted}, which this onnxruntime does not have{hint}; "
            f"installed: {', '.join(available)}"
        )
    return [p for p in PROVIDERS[key] if p in available]


def open_session(
    path: str | Path, providers: list[str], *, intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation; a missing or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: pass a file written by 'sdlora export'")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's own warnings would interleave with our JSON lines
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a loadable ONNX model ({first_line[:200]}); export it again") from exc


class OnnxClassifier:
    """One exported classifier: session, metadata, and ``logits`` over uint8 crops or prepared arrays."""

    def __init__(self, path: str | Path, *, provider: str | None = None, intra_op_threads: int | None = None) -> None:
        self.path = Path(path)
        providers = resolve_providers(provider)
        self.session = open_session(self.path, providers, intra_op_threads=intra_op_threads)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props, source=str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.provider = self.session.get_providers()[0]

    def describe_provider(self) -> str:
        """The line said once per command: which provider runs the model and why."""
        available = ort.get_available_providers()
        if self.provider == "CPUExecutionProvider" and "CUDAExecutionProvider" not in available:
            why = " (no CUDA in this onnxruntime install)"
        else:
            why = ""
        return f"onnxruntime {ort.__version__}: {self.provider}{why}"

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) crops -> the array this model's input takes (normalised NCHW unless in-graph)."""
        if self.metadata.input_layout == LAYOUT_UINT8:
            return np.ascontiguousarray(images)
        return normalize(images, self.metadata.mean, self.metadata.std)

    def run(self, prepared: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for an already prepared batch."""
        return self.session.run([self.output_name], {self.input_name: prepared})[0].astype(np.float32)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for uint8 (N, H, W, 3) crops at the model's input size."""
        return self.run(self.prepare(images))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one file."""

    path: str
    classes: tuple[str, ...]
    scores: tuple[float, ...]

    def to_json(self) -> str:
        """One JSON line: path, and top_k as [{"class": name, "score": probability}]."""
        top = [{"class": c, "score": round(s, 6)} for c, s in zip(self.classes, self.scores, strict=False)]
        return json.dumps({"path": self.path, "top_k": top})


@dataclass(frozen=True)
class FileFailure:
    """A file that could not be predicted, and why."""

    path: str
    reason: str


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_files(
    classifier: OnnxClassifier, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 32
) -> Iterable[Prediction | FileFailure]:
    """Top-k predictions per file, in input order; unreadable files come back as FileFailure, the rest still run."""
    if top_k <= 0:
        raise UserError(f"--top-k must be > 0 (got {top_k})")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")
    k = min(top_k, classifier.metadata.num_classes)
    names = classifier.metadata.class_names
    for chunk in _chunks(list(paths), batch_size):
        crops: list[np.ndarray] = []
        ok: list[str] = []
        failures: dict[str, str] = {}
        for path in chunk:
            try:
                crops.append(image_to_uint8(path, classifier.metadata))
                ok.append(path)
            except UserError as exc:
                failures[path] = str(exc)
        probs = softmax(classifier.logits(np.stack(crops))) if crops else np.zeros((0, len(names)))
        by_path = dict(zip(ok, probs, strict=False))
        for path in chunk:
            if path in failures:
                yield FileFailure(path, failures[path])
                continue
            p = by_path[path]
            top = np.argsort(-p, kind="stable")[:k]
            yield Prediction(path, tuple(names[i] for i in top), tuple(float(p[i]) for i in top))


def run_predict(
    model_path: str | Path,
    paths: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    provider: str | None = None,
) -> int:
    """``sdlora predict``: JSON lines on stdout, per-file errors on stderr; returns the number of failed files."""
    classifier = OnnxClassifier(model_path, provider=provider)
    log_rank_zero(classifier.describe_provider())
    failed = 0
    for result in predict_files(classifier, paths, top_k=top_k, batch_size=batch_size):
        if isinstance(result, FileFailure):
            failed += 1
            print(f"error: {result.reason}", file=sys.stderr, flush=True)
        else:
            print(result.to_json(), flush=True)
    return failed
