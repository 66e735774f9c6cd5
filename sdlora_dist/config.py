"""One typed config tree, loaded from YAML, overridden by ``--set key=value``, validated once (pydantic v2).

Choices are ``Literal`` types (the one list of valid names: other modules derive theirs with ``typing.get_args``),
ranges are ``Field`` bounds, and the few structural checks are field validators. Every problem is collected and
reported together in one ``ConfigError`` line, each as ``key: problem (got value)``. Past ``load_config`` nobody
reads a raw dict: code takes the typed models below. The configuration reference in ``docs/config.md`` is generated
from the field descriptions here (``sdlora config-docs``), so it cannot drift.

Add a field with its type, default, bounds and help text in one line, e.g.
``warmup_epochs: int = Field(0, ge=0, description="Epochs of linear lr warmup per task.")``.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from sdlora_dist.errors import UserError

Preset = Literal["paper", "official"]
MagnitudeMode = Literal["shared", "per_layer"]
ComputeMode = Literal["dense", "lowrank"]
Method = Literal["sdlora", "lora-seq"]
Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Tracker = Literal["csv", "tensorboard", "mlflow", "wandb"]
Normalize = Literal["model", "none", "imagenet", "half"]
ShardPolicy = Literal["error", "skip"]
_Finite = typing.Annotated[float, Field(allow_inf_nan=False)]
_Positive = typing.Annotated[float, Field(gt=0, allow_inf_nan=False)]
RGB = typing.Annotated[list[_Finite], Field(min_length=3, max_length=3)]  # one number per colour channel
PositiveRGB = typing.Annotated[list[_Positive], Field(min_length=3, max_length=3)]
HeadAlign = Literal["none", "gaussian"]
HeadAlignCov = Literal["shared", "diag", "full"]
Drift = Literal["none", "linear", "sdc"]
Head = Literal["linear", "ridge"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]

_PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(UserError):
    """One or more invalid config values; the message lists each as ``key: problem (got value)``."""


def config_root() -> Path:
    """The shipped ``configs`` folder (benchmark recipes, DeepSpeed template).

    A wheel installs it as ``sdlora_dist/configs``; a source checkout has it beside the package. When neither
    exists the package folder is returned, so lookups below it find nothing and fail with their own message.
    """
    candidates = (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")
    return next((p for p in candidates if (p / "benchmarks").is_dir()), _PACKAGE_DIR)


class _Section(BaseModel):
    # Unknown keys are errors; numbers given for text (a run dir named 2024) stay text, as YAML meant them.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelConfig(_Section):
    """The pre-trained backbone: a timm ViT, by name plus optional keyword overrides."""

    name: str = Field(
        "vit_base_patch16_224",
        description=(
            "timm model name (a ViT with fused qkv); with a local weights file and neither model.name nor "
            "model.kwargs set by you, taken from the file (config.json beside it, else its tensor shapes)."
        ),
    )
    weights: str | None = Field(
        None,
        description=(
            "Pre-trained weights: a local file (.safetensors, .pth/.bin/.pt state dict, timm .npz), 'hub' to "
            "download through timm (needs network), or 'random' for random init (tests, demos)."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (img_size, patch_size, depth, embed_dim, ...).",
    )
    resize_embeddings: bool = Field(
        False,
        description=(
            "Resample the weights' patch and position embeddings when their patch or image size differ from the "
            "model's (false: refused, naming both sizes)."
        ),
    )
    mean: RGB | None = Field(
        None,
        description=(
            "Input mean (RGB) of the weights, used when data.normalize=model; null = from the weights file "
            "(config.json beside it, or safetensors metadata), else timm's pretrained cfg of model.name."
        ),
    )
    std: PositiveRGB | None = Field(
        None, description="Input std (RGB) of the weights; null = from the weights file, else timm's."
    )
    interpolation: Interpolation | None = Field(
        None, description="Resize filter (bicubic, bilinear, ...); null = from the weights file, else timm's."
    )
    crop_pct: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Eval center-crop fraction; null = from the weights file, else data.eval_crop_pct.",
    )


class AdapterConfig(_Section):
    """SD-LoRA on the q and v slices of every block's fused qkv."""

    preset: Preset = Field("paper", description="Semantics: 'paper' (default) or 'official' (authors' code).")
    rank: int = Field(10, gt=0, description="LoRA rank of a task's pair when no rank_schedule is given.")
    rank_schedule: list[list[int]] | None = Field(
        None, description="SD-LoRA-RR: [[first_task, rank], ...] ascending from task 0, e.g. [[0,10],[4,8],[8,6]]."
    )
    blocks: list[typing.Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Block indices to adapt; null = all blocks."
    )
    magnitude: MagnitudeMode = Field("shared", description="'shared' (one alpha per task) or 'per_layer'.")
    init_magnitude: float = Field(
        0.8, allow_inf_nan=False, description="Initial alpha of a new task (official reset too)."
    )
    kd: bool = Field(False, description="SD-LoRA-KD: absorb a new direction into past ones when possible.")
    kd_threshold: float = Field(
        9e-4, gt=0, lt=1, description="KD: relative least-squares residual below which to absorb."
    )
    compute: ComputeMode = Field(
        "dense",
        description="Forward kernel: 'dense' folds all directions into W0 + dW per step, 'lowrank' keeps factors.",
    )

    @field_validator("rank_schedule")
    @classmethod
    def _schedule(cls, schedule: list[list[int]] | None) -> list[list[int]] | None:
        problems = rank_schedule_problems(schedule)
        if problems:
            raise ValueError(" and ".join(problems))
        return schedule


class DataConfig(_Section):
    """Shards and the streaming pipeline."""

    benchmark: str = Field("digits", description="Benchmark name (must match the shards' manifest).")
    shards: str | None = Field(
        None,
        description=(
            "Shard set written by 'sdlora data prepare': a folder or URL (file://, http(s)://, s3://, gs://, hf://, "
            "pipe:CMD)."
        ),
    )
    class_order_seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        description=(
            "Class order: np.random.seed(s); np.random.permutation(n) over the prepared classes (the authors' rule); "
            "null = the shard set's order (its prepare --seed)."
        ),
    )
    class_order: list[typing.Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Explicit class order: every prepared class index (as 'sdlora data inspect' lists them) once.",
    )
    tasks: int | None = Field(
        None, gt=0, description="Task split: the prepared classes in N near-equal tasks; null = the shard set's split."
    )
    classes_per_task: list[typing.Annotated[int, Field(gt=0)]] | None = Field(
        None,
        min_length=1,
        description="Task split as classes per task, e.g. [40, 40, 40, 40, 40] (instead of tasks).",
    )
    cache_dir: str | None = Field(
        None, description="Local cache of remote shards, checked against the manifest sha256 (null = off)."
    )
    streams: int = Field(
        8, gt=0, description="Train streams: global step i holds the same samples on every world size dividing this."
    )
    batch_size: int = Field(128, gt=0, description="Global training batch size (split evenly over ranks).")
    eval_batch_size: int = Field(256, gt=0, description="Per-rank evaluation batch size.")
    num_workers: int | None = Field(
        None,
        ge=0,
        description=(
            "DataLoader worker processes per rank; null = the CPU cores available per rank on the node less one, "
            "at most 4."
        ),
    )
    normalize: Normalize = Field(
        "model",
        description="'model' (mean/std of the pretrained cfg), 'none' (reference code: [0,1]), 'imagenet', 'half'.",
    )
    train_crop_scale: list[float] = Field(
        default_factory=lambda: [0.05, 1.0], description="RandomResizedCrop scale range for training."
    )
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability for training.")
    train_interpolation: Interpolation | None = Field(
        None,
        description=(
            "Resize filter of the train crop: null = the backbone's (bicubic for ViTs), 'bilinear' = torchvision's "
            "RandomResizedCrop default, which the authors' code uses."
        ),
    )
    eval_crop_pct: float = Field(0.875, gt=0, le=1, description="Eval: resize to img_size/crop_pct, center crop.")
    corrupt: ShardPolicy = Field("skip", description="Corrupt sample policy: 'skip' (counted, reported) or 'error'.")
    bad_shard: ShardPolicy = Field("error", description="Truncated/missing shard policy: 'error' or 'skip'.")

    @field_validator("class_order")
    @classmethod
    def _one_order(cls, order: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if order is not None and info.data.get("class_order_seed") is not None:
            raise ValueError("give data.class_order_seed or data.class_order, not both")
        return order

    @field_validator("classes_per_task")
    @classmethod
    def _one_split(cls, counts: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if counts is not None and info.data.get("tasks") is not None:
            raise ValueError("give data.tasks or data.classes_per_task, not both")
        return counts

    @field_validator("train_crop_scale")
    @classmethod
    def _crop_scale(cls, scale: list[float]) -> list[float]:
        if len(scale) != 2 or not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError("must be [lo, hi] with 0 < lo <= hi <= 1")
        return scale


class TrainConfig(_Section):
    """Optimisation, per task."""

    method: Method = Field("sdlora", description="'sdlora' or 'lora-seq' (one plain LoRA across tasks).")
    epochs: int = Field(20, gt=0, description="Epochs for tasks >= 1.")
    first_task_epochs: int | None = Field(None, gt=0, description="Epochs for task 0 (null = epochs).")
    optimizer: Optimizer = Field("sgd", description="'sgd' (momentum), 'adam' or 'adamw'.")
    lr: float = Field(0.01, gt=0, allow_inf_nan=False, description="Learning rate for tasks >= 1 (scaled by nothing).")
    first_task_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Learning rate for task 0 (null = lr)."
    )
    momentum: float = Field(0.9, description="SGD momentum.")
    weight_decay: float = Field(0.0, description="Weight decay.")
    milestones: list[int] = Field(default_factory=list, description="MultiStepLR epochs (empty = constant lr).")
    gamma: float = Field(0.1, description="MultiStepLR decay factor.")
    seed: int = Field(1993, description="Seed of model init and data order (data: seed, task, epoch).")
    precision: Precision = Field("auto", description="'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16', 'fp16'.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    checkpoint_every: int = Field(0, ge=0, description="Mid-task engine checkpoint every N steps (0 = off).")
    checkpoint_every_s: float = Field(
        1800.0, ge=0, description="Mid-task engine checkpoint every N seconds, decided on rank 0 (0 = off)."
    )
    max_steps_per_epoch: int | None = Field(None, gt=0, description="Cap steps per epoch (smoke runs).")
    grad_clip: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Clip the global gradient norm to this (0 = off)."
    )
    grad_accum: int = Field(
        1, gt=0,
        description=(
            "Micro-batches per optimizer step: each rank's share of data.batch_size is split in this many, so the "
            "global batch and the samples of every step stay the same (only memory changes)."
        ),
    )  # fmt: skip
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms: bitwise-repeatable GPU runs, slower (README)."
    )
    report_to: list[Tracker] | None = Field(
        None,
        description=(
            "Experiment trackers: 'csv', 'tensorboard', 'mlflow', 'wandb' (null = csv, plus tensorboard when "
            "installed). MLflow reads MLFLOW_TRACKING_URI, W&B its WANDB_* variables."
        ),
    )
    timeout_s: int = Field(600, gt=0, description="Process-group timeout: a dead rank ends the job after this.")
    tasks: int | None = Field(None, gt=0, description="Train only the first N tasks of the shards (null = all).")
    # not in the paper: 'none' keeps the paper's method exactly (head_align.py)
    head_align: HeadAlign = Field(
        "none",
        description=(
            "'none' (the paper) or 'gaussian': after each task, retrain the head of all seen classes on features "
            "sampled from stored per-class Gaussians (SLCA-style classifier alignment, no images kept)."
        ),
    )
    head_align_cov: HeadAlignCov = Field(
        "shared",
        description=(
            "Covariance kept per class: 'shared' (one pooled within-class covariance, d^2 in all; well estimated "
            "when classes have fewer samples than d), 'diag' (d per class) or 'full' (d^2 per class)."
        ),
    )
    head_align_epochs: int = Field(5, gt=0, description="head_align: epochs over freshly sampled features.")
    head_align_samples: int = Field(256, gt=0, description="head_align: features sampled per class per epoch.")
    head_align_lr: float = Field(
        0.01, gt=0, allow_inf_nan=False, description="head_align: SGD (momentum 0.9) learning rate."
    )
    head_align_batch_size: int = Field(128, gt=0, description="head_align: batch size of sampled features.")
    # not in the paper: the default since issue 21 (BENCHMARKS.md); the paper recipes set 'linear' (ridge_head.py)
    head: Head = Field(
        "ridge",
        description=(
            "'ridge' (default): evaluate, export and predict with a closed-form ridge classifier on fixed random "
            "ReLU features of the backbone (RanPAC-style; tasks still train the paper's head), or 'linear' (the "
            "paper's head, trained with the tasks; what the paper recipes and --format timm use). Unset, "
            "head_align=gaussian selects 'linear' (the head it aligns)."
        ),
    )
    ridge_dim: int = Field(1024, gt=0, description="head=ridge: width M of the random projection.")
    ridge_lambda: float = Field(
        0.01, gt=0, allow_inf_nan=False, description="head=ridge: ridge penalty, relative to trace(Gram) / M."
    )
    # not in the paper: 'none' keeps stored statistics as measured (drift.py)
    drift: Drift = Field(
        "none",
        description=(
            "Move stored class statistics (head_align=gaussian or head=ridge) into the current feature space after "
            "each task: 'none', 'linear' (ridge-fitted affine map) or 'sdc' (distance-weighted mean shift); "
            "fitted on the current task's samples before and after it."
        ),
    )
    drift_ridge: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="drift=linear: pull of the map towards the identity."
    )
    sdc_bandwidth: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="drift=sdc: kernel width^2 relative to the features' spread."
    )

    @model_validator(mode="before")
    @classmethod
    def _gaussian_aligns_the_linear_head(cls, data: Any) -> Any:
        """``head_align=gaussian`` with no ``head`` given selects the linear head it aligns."""
        if isinstance(data, dict) and "head" not in data and data.get("head_align") == "gaussian":
            return {**data, "head": "linear"}
        return data

    @field_validator("head")
    @classmethod
    def _one_head_fix(cls, head: str, info: ValidationInfo) -> str:
        if head == "ridge" and info.data.get("head_align") == "gaussian":
            raise ValueError("head=ridge replaces the aligned linear head at inference; set train.head=linear to "
                             "align the paper's head, or train.head_align=none")  # fmt: skip
        return head

    @field_validator("drift")
    @classmethod
    def _drift_needs_stats(cls, drift: str, info: ValidationInfo) -> str:
        if drift != "none" and info.data.get("head_align") != "gaussian" and info.data.get("head") != "ridge":
            raise ValueError("drift compensation needs stored statistics: set train.head_align=gaussian or "
                             "train.head=ridge")  # fmt: skip
        return drift

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, milestones: list[int]) -> list[int]:
        if milestones != sorted(milestones):
            raise ValueError("must be ascending")
        return milestones


class Config(_Section):
    """The whole run: what ``sdlora train`` reads and saves as ``config.yaml`` in the run directory."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run_dir: str = Field(
        "runs/latest",
        description=(
            "Run directory (checkpoints, metrics); 'sdlora train' sets it: --run-dir, else runs/<benchmark>-<time>."
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return self.model_dump()

    def hash(self) -> str:
        """Stable short hash of everything that changes results (run_dir excluded)."""
        payload = self.to_dict()
        payload.pop("run_dir", None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# Validation messages: pydantic's errors, rewritten as ``key: problem (got value)``

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true/false",
    "bool_parsing": "true/false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def rank_schedule_problems(schedule: list[list[int]] | None) -> list[str]:
    """Problems of a rank schedule ``[[task, rank], ...]``: strictly ascending tasks from 0, positive ranks."""
    if schedule is None:
        return []
    if not schedule:
        return ["must not be empty"]
    if any(not isinstance(e, (list, tuple)) or len(e) != 2 for e in schedule):
        return ["each entry must be [first_task, rank]"]
    tasks = [e[0] for e in schedule]
    problems = []
    if tasks[0] != 0:
        problems.append("the first entry must start at task 0")
    if any(b <= a for a, b in zip(tasks, tasks[1:], strict=False)):
        problems.append("task indices must be strictly ascending")
    if any(e[1] <= 0 for e in schedule):
        problems.append("ranks must be > 0")
    return problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _lookup(loc: tuple[int | str, ...]) -> tuple[type[BaseModel], FieldInfo | None]:
    """The section model holding ``loc`` and the field it names (None for an unknown key or a list item)."""
    section: type[BaseModel] = Config
    info: FieldInfo | None = None
    for part in loc:
        if info is not None:
            if not _is_section(info):
                return section, None
            section = info.annotation
        info = section.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return section, None
    return section, info


def _bounds_text(info: FieldInfo | None, ctx: dict[str, Any]) -> str:
    """The field's whole allowed range (``must be in (0, 1)``), not only the one bound the value broke."""
    bounds = dict(ctx)
    if info is not None:
        for meta in info.metadata:
            bounds.update({k: getattr(meta, k) for k in ("gt", "ge", "lt", "le") if hasattr(meta, k)})
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"must be in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        is_float = info is not None and float in (info.annotation, *typing.get_args(info.annotation))
        if is_float and lo == ("(", 0):
            return "must be a positive number"
        return f"must be {'>' if lo[0] == '(' else '>='} {lo[1]}"
    assert hi is not None
    return f"must be {'<' if hi[0] == ')' else '<='} {hi[1]}"


def _problem(error: Any) -> str:
    """One pydantic error as ``problem`` text (without key and value)."""
    kind, ctx, loc = error["type"], error.get("ctx") or {}, error["loc"]
    section, info = _lookup(loc)
    if kind == "extra_forbidden":
        return f"unknown key, expected one of {', '.join(sorted(section.model_fields))}"
    if kind == "literal_error" and info is not None:
        choices = [c for arg in (info.annotation, *typing.get_args(info.annotation)) for c in _literal_values(arg)]
        return f"must be one of {', '.join(str(c) for c in choices)}"
    if kind in _BOUNDS:
        return _bounds_text(info, ctx)
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "too_short":
        return f"must hold at least {ctx['min_length']} item(s)"
    if kind == "value_error":
        return str(ctx["error"])
    return error["msg"][:1].lower() + error["msg"][1:]


def _literal_values(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _config_error(exc: ValidationError) -> ConfigError:
    """Every problem of ``exc`` in one line: ``invalid config: key: problem (got value); ...``."""
    messages = [f"{_dotted(e['loc']) or 'config'}: {_problem(e)} (got {e['input']!r})" for e in exc.errors()]
    return ConfigError("invalid config: " + "; ".join(messages))


# --------------------------------------------------------------------------------------------------------------------
# Loading and saving


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError (a UserError) naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level (got {type(data).__name__})")
    return data


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict; raises ConfigError listing every problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; optional), apply ``--set`` overrides, validate once."""
    raw = read_yaml_mapping(Path(path)) if path is not None else {}
    apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from sdlora_dist.fileio import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))


# --------------------------------------------------------------------------------------------------------------------
# Reference documentation


def _type_text(tp: Any) -> str:
    """A type as a reader writes it: ``'sgd' | 'adam'``, ``list[int] | None``, ``dict[str, Any]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _is_section(info: FieldInfo) -> bool:
    return isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)


def _validate_split(d: DataConfig) -> list[str]:
    """Class order and task split: one way each, positive counts (the shard set checks the rest at train time)."""
    errors = []
    if d.class_order_seed is not None and d.class_order is not None:
        errors.append(
            f"data.class_order: give data.class_order_seed or data.class_order, not both (got {d.class_order})"
        )
    if d.tasks is not None and d.classes_per_task is not None:
        errors.append(
            f"data.classes_per_task: give data.tasks or data.classes_per_task, not both (got {d.classes_per_task})"
        )
    if d.tasks is not None and d.tasks <= 0:
        errors.append(f"data.tasks: must be > 0 (got {d.tasks})")
    if d.classes_per_task is not None and (not d.classes_per_task or min(d.classes_per_task) <= 0):
        errors.append(f"data.classes_per_task: must be a non-empty list of counts > 0 (got {d.classes_per_task})")
    if d.class_order_seed is not None and not 0 <= d.class_order_seed < 2**32:
        errors.append(f"data.class_order_seed: must be in 0..2**32-1, numpy's seed range (got {d.class_order_seed})")
    return errors


def config_reference() -> str:
    """Markdown reference of every key, generated from the config models (checked by a test)."""
    lines = ["# Configuration reference", "", "Generated by `sdlora config-docs` from `sdlora_dist/config.py`.", ""]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        leaves = {name: info for name, info in cls.model_fields.items() if not _is_section(info)}
        if leaves:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (cls.__doc__ or "").strip(), ""])
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
            for name, info in leaves.items():
                tp = _type_text(info.annotation).replace("|", "\\|")
                default = json.dumps(info.get_default(call_default_factory=True))
                lines.append(f"| `{prefix}{name}` | `{tp}` | `{default}` | {info.description or ''} |")
            lines.append("")
        for name, info in cls.model_fields.items():
            if _is_section(info):
                walk(info.annotation, f"{prefix}{name}.")

    walk(Config, "")
    return "\n".join(lines)
