"""One typed config tree, loaded from YAML, overridden by ``--set key=value``, validated once.

Every problem is collected and reported together, each naming the key and the value received. Past
``load_config`` nobody reads a raw dict: code takes the typed dataclasses below. The configuration reference
in ``docs/config.md`` is generated from the field metadata here (``sdlora config-docs``), so it cannot drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdlora_dist.errors import UserError

PRESETS = ("paper", "official")
MAGNITUDE_MODES = ("shared", "per_layer")
COMPUTE_MODES = ("dense", "lowrank")
METHODS = ("sdlora", "lora-seq")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMALIZE = ("model", "none", "imagenet", "half")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CORRUPT_POLICIES = ("error", "skip")


class ConfigError(UserError):
    """One or more invalid config values; the message lists each as ``key: problem (got value)``."""


def _help(text: str, **kw: Any) -> Any:
    return {"help": text, **kw}


@dataclass
class ModelConfig:
    """The pre-trained backbone: a timm ViT, by name plus optional keyword overrides."""

    name: str = field(default="vit_base_patch16_224", metadata=_help("timm model name (a ViT with fused qkv)."))
    weights: str | None = field(
        default=None,
        metadata=_help(
            "Pre-trained weights: a local file (.safetensors, .pth/.bin/.pt state dict, timm .npz), 'hub' to "
            "download through timm (needs network), or 'random' for random init (tests, demos)."
        ),
    )
    kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Extra keyword arguments for timm.create_model (img_size, patch_size, depth, embed_dim, ...)."),
    )


@dataclass
class AdapterConfig:
    """SD-LoRA on the q and v slices of every block's fused qkv."""

    preset: str = field(default="paper", metadata=_help("Semantics: 'paper' (default) or 'official' (authors' code)."))
    rank: int = field(default=10, metadata=_help("LoRA rank of a task's pair when no rank_schedule is given."))
    rank_schedule: list[list[int]] | None = field(
        default=None,
        metadata=_help("SD-LoRA-RR: [[first_task, rank], ...] ascending from task 0, e.g. [[0,10],[4,8],[8,6]]."),
    )
    blocks: list[int] | None = field(default=None, metadata=_help("Block indices to adapt; null = all blocks."))
    magnitude: str = field(default="shared", metadata=_help("'shared' (one alpha per task) or 'per_layer'."))
    init_magnitude: float = field(default=0.8, metadata=_help("Initial alpha of a new task (official reset too)."))
    kd: bool = field(default=False, metadata=_help("SD-LoRA-KD: absorb a new direction into past ones when possible."))
    kd_threshold: float = field(
        default=9e-4, metadata=_help("KD: relative least-squares residual below which to absorb.")
    )
    compute: str = field(
        default="dense",
        metadata=_help("Forward kernel: 'dense' folds all directions into W0 + dW per step, 'lowrank' keeps factors."),
    )


@dataclass
class DataConfig:
    """Shards and the streaming pipeline."""

    benchmark: str = field(default="digits", metadata=_help("Benchmark name (must match the shards' manifest)."))
    shards: str | None = field(default=None, metadata=_help("Shard directory written by 'sdlora data prepare'."))
    class_order_seed: int | None = field(
        default=None,
        metadata=_help(
            "Class order: np.random.seed(s); np.random.permutation(n) over the prepared classes (the authors' rule); "
            "null = the shard set's order (its prepare --seed)."
        ),
    )
    class_order: list[int] | None = field(
        default=None,
        metadata=_help("Explicit class order: every prepared class index (as 'sdlora data inspect' lists them) once."),
    )
    tasks: int | None = field(
        default=None,
        metadata=_help("Task split: the prepared classes in N near-equal tasks; null = the shard set's split."),
    )
    classes_per_task: list[int] | None = field(
        default=None, metadata=_help("Task split as classes per task, e.g. [40, 40, 40, 40, 40] (instead of tasks).")
    )
    batch_size: int = field(default=128, metadata=_help("Global training batch size (split evenly over ranks)."))
    eval_batch_size: int = field(default=256, metadata=_help("Per-rank evaluation batch size."))
    num_workers: int = field(default=4, metadata=_help("DataLoader worker processes per rank."))
    normalize: str = field(
        default="model",
        metadata=_help(
            "'model' (mean/std of the pretrained cfg), 'none' (reference code: [0,1]), 'imagenet', 'half'."
        ),
    )
    train_crop_scale: list[float] = field(
        default_factory=lambda: [0.05, 1.0], metadata=_help("RandomResizedCrop scale range for training.")
    )
    hflip: float = field(default=0.5, metadata=_help("Horizontal flip probability for training."))
    train_interpolation: str | None = field(
        default=None,
        metadata=_help(
            "Resize filter of the train crop: null = the backbone's (bicubic for ViTs), 'bilinear' = torchvision's "
            "RandomResizedCrop default, which the authors' code uses."
        ),
    )
    eval_crop_pct: float = field(default=0.875, metadata=_help("Eval: resize to img_size/crop_pct, center crop."))
    corrupt: str = field(
        default="skip", metadata=_help("Corrupt sample policy: 'skip' (counted, reported) or 'error'.")
    )
    bad_shard: str = field(default="error", metadata=_help("Truncated/missing shard policy: 'error' or 'skip'."))


@dataclass
class TrainConfig:
    """Optimisation, per task."""

    method: str = field(default="sdlora", metadata=_help("'sdlora' or 'lora-seq' (one plain LoRA across tasks)."))
    epochs: int = field(default=20, metadata=_help("Epochs for tasks >= 1."))
    first_task_epochs: int | None = field(default=None, metadata=_help("Epochs for task 0 (null = epochs)."))
    optimizer: str = field(default="sgd", metadata=_help("'sgd' (momentum), 'adam' or 'adamw'."))
    lr: float = field(default=0.01, metadata=_help("Learning rate for tasks >= 1 (scaled by nothing)."))
    first_task_lr: float | None = field(default=None, metadata=_help("Learning rate for task 0 (null = lr)."))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum."))
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay."))
    milestones: list[int] = field(default_factory=list, metadata=_help("MultiStepLR epochs (empty = constant lr)."))
    gamma: float = field(default=0.1, metadata=_help("MultiStepLR decay factor."))
    seed: int = field(default=1993, metadata=_help("Seed of model init and data order (data: seed, task, epoch)."))
    precision: str = field(
        default="auto", metadata=_help("'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16', 'fp16'.")
    )
    zero_stage: int = field(default=0, metadata=_help("DeepSpeed ZeRO stage (0-3)."))
    checkpoint_every: int = field(default=0, metadata=_help("Mid-task engine checkpoint every N steps (0 = off)."))
    max_steps_per_epoch: int | None = field(default=None, metadata=_help("Cap steps per epoch (smoke runs)."))
    timeout_s: int = field(default=600, metadata=_help("Process-group timeout: a dead rank ends the job after this."))
    tasks: int | None = field(default=None, metadata=_help("Train only the first N tasks of the shards (null = all)."))


@dataclass
class Config:
    """The whole run: what ``sdlora train`` reads and saves as ``config.yaml`` in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = field(
        default="runs/latest",
        metadata=_help(
            "Run directory (checkpoints, metrics); 'sdlora train' sets it: --run-dir, else runs/<benchmark>-<time>."
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of everything that changes results (run_dir excluded)."""
        payload = self.to_dict()
        payload.pop("run_dir", None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# Loading and type coercion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or record an error naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping (got {value!r})")
            return tp()
        return _build(tp, value, key + ".", errors)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a list (got {value!r})")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping (got {value!r})")
            return {}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        errors.append(f"{key}: expected true/false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append(f"{key}: expected an integer (got {value!r})")
            return value
        try:
            return int(value)
        except ValueError:
            errors.append(f"{key}: expected an integer (got {value!r})")
            return value
    if tp is float:
        if isinstance(value, bool):
            errors.append(f"{key}: expected a number (got {value!r})")
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            errors.append(f"{key}: expected a number (got {value!r})")
            return value
    if tp is str:
        if isinstance(value, (dict, list)):
            errors.append(f"{key}: expected a string (got {value!r})")
            return value
        return str(value)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(raw) - names):
        errors.append(f"{prefix}{unknown}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(raw[name], hints[name], prefix + name, errors) for name in names if name in raw}
    return cls(**kwargs)


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
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    if not errors:
        errors.extend(validate(cfg))
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
    return cfg


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
# Validation


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> list[str]:
    return [] if value in valid else [f"{key}: must be one of {', '.join(valid)} (got {value!r})"]


def validate_rank_schedule(schedule: list[list[int]] | None, key: str = "adapter.rank_schedule") -> list[str]:
    """A schedule is [[task, rank], ...], strictly ascending tasks from 0, positive ranks."""
    if schedule is None:
        return []
    if not schedule:
        return [f"{key}: must not be empty (got [])"]
    errors = []
    if any(not isinstance(e, (list, tuple)) or len(e) != 2 for e in schedule):
        return [f"{key}: each entry must be [first_task, rank] (got {schedule!r})"]
    tasks = [e[0] for e in schedule]
    if tasks[0] != 0:
        errors.append(f"{key}: the first entry must start at task 0 (got {schedule!r})")
    if any(b <= a for a, b in zip(tasks, tasks[1:], strict=False)):
        errors.append(f"{key}: task indices must be strictly ascending (got {schedule!r})")
    if any(e[1] <= 0 for e in schedule):
        errors.append(f"{key}: ranks must be > 0 (got {schedule!r})")
    return errors


def validate(cfg: Config) -> list[str]:
    """Every semantic check of the tree; returns messages ``key: problem (got value)``."""
    a, d, t = cfg.adapter, cfg.data, cfg.train
    errors: list[str] = []
    errors += _choice("adapter.preset", a.preset, PRESETS)
    errors += _choice("adapter.magnitude", a.magnitude, MAGNITUDE_MODES)
    errors += _choice("adapter.compute", a.compute, COMPUTE_MODES)
    errors += _choice("train.method", t.method, METHODS)
    errors += _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    errors += _choice("train.precision", t.precision, PRECISIONS)
    errors += _choice("data.normalize", d.normalize, NORMALIZE)
    if d.train_interpolation is not None:
        errors += _choice("data.train_interpolation", d.train_interpolation, INTERPOLATIONS)
    errors += _choice("data.corrupt", d.corrupt, CORRUPT_POLICIES)
    errors += _choice("data.bad_shard", d.bad_shard, CORRUPT_POLICIES)
    if a.rank <= 0:
        errors.append(f"adapter.rank: must be > 0 (got {a.rank})")
    errors += validate_rank_schedule(a.rank_schedule)
    if not (0.0 < a.kd_threshold < 1.0):
        errors.append(f"adapter.kd_threshold: must be in (0, 1) (got {a.kd_threshold})")
    if not math.isfinite(a.init_magnitude):
        errors.append(f"adapter.init_magnitude: must be finite (got {a.init_magnitude})")
    if a.blocks is not None and (not a.blocks or any(b < 0 for b in a.blocks)):
        errors.append(f"adapter.blocks: must be null or a non-empty list of block indices >= 0 (got {a.blocks})")
    for key, value in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        if value <= 0:
            errors.append(f"{key}: must be > 0 (got {value})")
    if d.num_workers < 0:
        errors.append(f"data.num_workers: must be >= 0 (got {d.num_workers})")
    errors += _validate_split(d)
    if len(d.train_crop_scale) != 2 or not (0 < d.train_crop_scale[0] <= d.train_crop_scale[1] <= 1):
        errors.append(f"data.train_crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1 (got {d.train_crop_scale})")
    if not (0.0 <= d.hflip <= 1.0):
        errors.append(f"data.hflip: must be in [0, 1] (got {d.hflip})")
    if not (0.0 < d.eval_crop_pct <= 1.0):
        errors.append(f"data.eval_crop_pct: must be in (0, 1] (got {d.eval_crop_pct})")
    for key, value in (("train.epochs", t.epochs), ("train.first_task_epochs", t.first_task_epochs)):
        if value is not None and value <= 0:
            errors.append(f"{key}: must be > 0 (got {value})")
    for key, value in (("train.lr", t.lr), ("train.first_task_lr", t.first_task_lr)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            errors.append(f"{key}: must be a positive number (got {value})")
    if t.zero_stage not in (0, 1, 2, 3):
        errors.append(f"train.zero_stage: must be 0, 1, 2 or 3 (got {t.zero_stage})")
    if t.checkpoint_every < 0:
        errors.append(f"train.checkpoint_every: must be >= 0 (got {t.checkpoint_every})")
    if t.timeout_s <= 0:
        errors.append(f"train.timeout_s: must be > 0 (got {t.timeout_s})")
    if t.milestones != sorted(t.milestones):
        errors.append(f"train.milestones: must be ascending (got {t.milestones})")
    if t.tasks is not None and t.tasks <= 0:
        errors.append(f"train.tasks: must be > 0 (got {t.tasks})")
    if t.max_steps_per_epoch is not None and t.max_steps_per_epoch <= 0:
        errors.append(f"train.max_steps_per_epoch: must be > 0 (got {t.max_steps_per_epoch})")
    return errors


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
    """Markdown reference of every key, generated from the dataclasses (checked by a test)."""
    lines = ["# Configuration reference", "", "Generated by `sdlora config-docs` from `sdlora_dist/config.py`.", ""]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        section = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if section:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (cls.__doc__ or "").strip(), ""])
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
            for f in section:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                tp = (
                    str(hints[f.name])
                    .replace("typing.", "")
                    .replace("<class '", "")
                    .replace("'>", "")
                    .replace("|", "\\|")
                )
                lines.append(
                    f"| `{prefix}{f.name}` | `{tp}` | `{json.dumps(default)}` | {f.metadata.get('help', '')} |"
                )
            lines.append("")
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config, "")
    return "\n".join(lines)
