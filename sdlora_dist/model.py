"""The SD-LoRA model: a timm ViT (local weights) with SD-LoRA on q/v of each block's fused qkv and a growing head.

Lifecycle, guarded: ``add_task(n)`` opens a task (new pair, new magnitude, new head rows) -> train ->
``consolidate()`` closes it (freeze / absorb) -> ``add_task`` for the next one -> ... -> ``merge()`` returns a plain
timm ViT. Consolidation is the transition *between* tasks: the model after the last task is the trained one,
unconsolidated, so what is evaluated, saved and merged is exactly what was trained (with shared magnitudes the
paper rule's re-scaling is a least-squares approximation, so consolidating after the last task would cost accuracy
for nothing).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdlora_dist.adapters import MagnitudeBank, SDLoRAQKV
from sdlora_dist.config import AdapterConfig, Config, ModelConfig
from sdlora_dist.consolidate import Decision, fit_in_span, plan_absorption, plan_freeze, rank_for_task
from sdlora_dist.errors import UserError, listed
from sdlora_dist.fileio import file_sha256
from sdlora_dist.weights import beside_config, embedding_mismatch, read_state_dict


def task_key(task: int) -> str:
    """Name of task ``task``'s per-task state (``task_03``)."""
    return f"task_{task:02d}"


# ---------------------------------------------------------------------------------------------------------------------
# Backbone


PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct")


def _preprocessing_from_mapping(raw: Any) -> dict[str, Any]:
    """mean/std/interpolation/crop_pct of a timm/HF ``config.json``: under ``pretrained_cfg`` or at the top level."""
    if not isinstance(raw, dict):
        return {}
    nested = raw.get("pretrained_cfg")
    found = {k: raw[k] for k in PREPROCESSING_KEYS if k in raw}
    if isinstance(nested, dict):
        found.update({k: nested[k] for k in PREPROCESSING_KEYS if k in nested})
    return found


def weights_preprocessing(path: str | Path) -> tuple[dict[str, Any], str | None]:
    """(preprocessing the weights file carries, where it was found); ({}, None) when it carries none.

    Looked up in a timm/Hugging Face ``config.json`` beside the file (``pretrained_cfg.mean`` ... or top-level
    ``mean`` ...), then in a safetensors header's ``__metadata__`` (values JSON-encoded strings, as metadata must be
    strings). A file that cannot be parsed is a UserError naming it, not a silent fallback to timm's defaults.
    """
    import json

    path = Path(path)
    found: dict[str, Any] = {}
    source = None
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        for key in PREPROCESSING_KEYS:
            if key in meta:
                try:
                    found[key] = json.loads(meta[key])
                except json.JSONDecodeError:
                    found[key] = meta[key]  # plain strings such as bicubic
        source = f"{path} metadata" if found else None
    from_json = _preprocessing_from_mapping(beside_config(path))
    if from_json:
        found.update(from_json)
        source = str(path.parent / "config.json")
    return found, source


def fill_preprocessing_from_weights(model_cfg: ModelConfig) -> tuple[ModelConfig, str | None]:
    """``model_cfg`` with each unset model.mean/std/interpolation/crop_pct taken from the weights file.

    Explicit config values win. Returns the new config and where the filled values came from (None: nothing).
    """
    if model_cfg.weights in (None, "hub", "random"):
        return model_cfg, None
    found, source = weights_preprocessing(model_cfg.weights)
    fill = {k: v for k, v in found.items() if getattr(model_cfg, k) is None}
    if "mean" in fill or "std" in fill:
        fill = {k: list(v) if k in ("mean", "std") else v for k, v in fill.items()}
    return (model_cfg.model_copy(update=fill), source) if fill else (model_cfg, None)  # caller validates


def load_backbone_weights(backbone: nn.Module, path: str | Path, *, resize: bool = False) -> dict[str, Any]:
    """Load pre-trained weights from a local file into a timm ViT (head weights are ignored).

    Formats: ``.safetensors``, ``.pth``/``.pt``/``.bin`` state dicts, and timm/big_vision ``.npz``. Returns what was
    loaded: ``{"path", "tensors", "sha256"}`` (absolute path, tensors loaded, sha256 prefix of the file). Weights of
    another patch or image size are refused unless ``resize`` (model.resize_embeddings): timm's filter would
    resample the patch and position embeddings into a model the weights were never trained as.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.weights: file {path} does not exist; pass a local weights file, 'hub' or 'random'")
    report = {"path": str(path.absolute()), "tensors": 0, "sha256": file_sha256(path)[:16]}
    if path.suffix.lower() == ".npz":
        try:
            backbone.load_pretrained(str(path))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"model.weights: {path} does not match model {type(backbone).__name__}: {exc}") from exc
        return {**report, "tensors": len(backbone.state_dict())}
    try:
        state = read_state_dict(path)
    except (RuntimeError, OSError, ValueError) as exc:  # unsafe pickles are refused in read_state_dict
        raise UserError(f"model.weights: cannot read {path}: {str(exc).splitlines()[0]}") from exc
    mismatch = embedding_mismatch({k: tuple(v.shape) for k, v in state.items()}, backbone)
    if mismatch is not None and not resize:
        file_size, model_size, matching = mismatch
        raise UserError(
            f"model.weights: {path} holds {file_size} but the model is {model_size}; pass {matching} to match "
            "the file, or --set model.resize_embeddings=true to resample its embeddings"
        )
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in checkpoint_filter_fn(state, backbone).items() if not k.startswith("head.")}
    own = backbone.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"shape mismatch: {listed(bad)}" if bad else "",
                f"missing: {listed(missing)}" if missing else "",
                f"unexpected: {listed(unexpected)}" if unexpected else "",
            )
            if part
        )
        raise UserError(
            f"model.weights: {path} does not fit model.name/model.kwargs ({detail}); use weights of the same "
            "architecture, or leave model.name/model.kwargs unset to take them from the file"
        )
    backbone.load_state_dict(state, strict=True)
    return {**report, "tensors": len(state)}


def _apply_preprocessing(backbone: nn.Module, model_cfg: ModelConfig) -> None:
    """Overlay explicit model.mean/std/interpolation/crop_pct on timm's pretrained cfg (what the model reports)."""
    overrides = {k: getattr(model_cfg, k) for k in PREPROCESSING_KEYS if getattr(model_cfg, k) is not None}
    backbone.pretrained_cfg = {**(getattr(backbone, "pretrained_cfg", {}) or {}), **overrides}
    backbone.preprocessing_overrides = overrides


def build_backbone(model_cfg: ModelConfig) -> nn.Module:
    """``timm.create_model`` with no classifier (features = CLS after the final norm), then the weights."""
    import timm

    if model_cfg.weights is None:
        raise UserError(
            "model.weights is not set: pass --set model.weights=/path/to/vit.safetensors (local file), "
            "model.weights=hub (download, needs network) or model.weights=random"
        )
    if not timm.is_model(model_cfg.name):
        close = difflib.get_close_matches(model_cfg.name, timm.list_models("vit_*"), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
        raise UserError(f"model.name: unknown timm model {model_cfg.name!r}{hint}")
    pretrained = model_cfg.weights == "hub"
    try:
        backbone = timm.create_model(model_cfg.name, pretrained=pretrained, num_classes=0, **model_cfg.kwargs)
    except TypeError as exc:
        raise UserError(f"model.kwargs: {model_cfg.kwargs} rejected by {model_cfg.name}: {exc}") from exc
    except Exception as exc:  # hub download failures come in many types (HTTP, OS, HF errors)
        if pretrained:
            raise UserError(
                f"model.weights=hub: could not download {model_cfg.name} ({type(exc).__name__}); offline machines "
                "must pass a local file: --set model.weights=/path/to/vit.safetensors"
            ) from exc
        raise
    if not hasattr(backbone, "blocks") or not hasattr(backbone.blocks[0].attn, "qkv"):
        raise UserError(f"model.name: {model_cfg.name} has no blocks[i].attn.qkv (SD-LoRA needs a ViT with fused qkv)")
    backbone.loaded_weights = {"path": model_cfg.weights, "tensors": 0, "sha256": ""}
    if model_cfg.weights not in ("hub", "random"):
        backbone.loaded_weights = load_backbone_weights(
            backbone, model_cfg.weights, resize=model_cfg.resize_embeddings
        )
    _apply_preprocessing(backbone, model_cfg)
    return backbone


# ---------------------------------------------------------------------------------------------------------------------
# Head


class TaskHead(nn.Module):
    """A growing linear classifier: rows per task under ``task_XX`` names; only the newest task's rows train."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()

    def add(self, key: str, num_classes: int, *, device: torch.device, dtype: torch.dtype) -> None:
        """New rows: kaiming-uniform (linear gain, as the reference's SimpleLinear), zero bias; older rows freeze."""
        for p in list(self.weight.values()) + list(self.bias.values()):
            p.requires_grad_(False)
        w = torch.empty(num_classes, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, nonlinearity="linear")
        self.weight[key] = nn.Parameter(w)
        self.bias[key] = nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype))

    @property
    def num_classes(self) -> int:
        """Classes seen so far."""
        return sum(w.shape[0] for w in self.weight.values())

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [n_seen, D] and bias [n_seen] over all tasks, in task order."""
        return torch.cat(list(self.weight.values())), torch.cat(list(self.bias.values()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over every class seen so far."""
        w, b = self.full()
        return F.linear(features, w, b)


# ---------------------------------------------------------------------------------------------------------------------
# Model


class SDLoRAViT(nn.Module):
    """A timm ViT with SD-LoRA adapters and a growing head; ``state_dict()`` + :meth:`layout` is the checkpoint."""

    def __init__(self, backbone: nn.Module, adapter_cfg: AdapterConfig, *, method: str = "sdlora") -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = adapter_cfg
        self.method = method
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.block_ids = select_blocks(backbone, adapter_cfg)
        slots = 1 if adapter_cfg.magnitude == "shared" else 2 * len(self.block_ids)
        self.magnitudes = MagnitudeBank(slots)
        inject_adapters(backbone, adapter_cfg, self.magnitudes, self.block_ids)
        self.head = TaskHead(backbone.num_features)
        # train.head=ridge: the analytic head used instead of ``head`` outside training (ridge_head.py; no state_dict
        # entries: it is rebuilt from the task folder's statistics)
        self.inference_head: nn.Module | None = None
        self.num_tasks = 0  # tasks opened (head groups)
        self.frozen_keys: list[str] = []
        self.current_key: str | None = None  # the pair training now (or trained last, before consolidate)
        self.task_classes: list[int] = []
        self.decisions: list[dict] = []

    # -------------------------------------------------------------------------------------------------------------
    # Views

    @property
    def adapters(self) -> list[SDLoRAQKV]:
        """The SD-LoRA wrappers, in block order."""
        return [self.backbone.blocks[i].attn.qkv for i in self.block_ids]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained cfg (mean, std, interpolation, crop_pct) with the model's real input size."""
        cfg = dict(getattr(self.backbone, "pretrained_cfg", {}) or {})
        size = self.backbone.patch_embed.img_size
        cfg["input_size"] = (3, int(size[0]), int(size[1]))
        return cfg

    def class_offset(self, task: int) -> int:
        """First global label of task ``task``."""
        return sum(self.task_classes[:task])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """CLS feature after the final norm (the backbone has no classifier)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over all classes seen so far (task-agnostic inference)."""
        if self.num_tasks == 0:
            raise RuntimeError("forward() before add_task(): the model has no classes yet")
        head = self.head if self.inference_head is None else self.inference_head
        return head(self.backbone(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the current task trains: its pair, every trainable magnitude, its head rows."""
        return [p for p in self.parameters() if p.requires_grad]

    # -------------------------------------------------------------------------------------------------------------
    # Lifecycle

    def add_task(self, num_classes: int) -> int:
        """Open the next task: head rows, and (sdlora) a new pair + magnitude. Returns the task index."""
        if self.current_key is not None and self.method == "sdlora":
            raise RuntimeError(f"add_task(): task {self.current_key} is still open; call consolidate() first")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0 (got {num_classes})")
        t = self.num_tasks
        key = task_key(t)
        ref = self.backbone.patch_embed.proj.weight
        self.head.add(key, num_classes, device=ref.device, dtype=ref.dtype)
        if self.method == "lora-seq":
            if self.current_key is None:  # one plain LoRA across all tasks, magnitude fixed to 1
                self._open_pair(key, self.cfg.rank, init=1.0, trainable_magnitude=False)
        else:
            if self.cfg.preset == "official":  # the authors rebuild every alpha at each task (sdlora.py:109)
                with torch.no_grad():
                    for p in self.magnitudes.values.values():
                        p.fill_(self.cfg.init_magnitude)
            self._open_pair(key, rank_for_task(t, self.cfg.rank, self.cfg.rank_schedule), init=self.cfg.init_magnitude)
        self.num_tasks += 1
        self.task_classes.append(num_classes)
        return t

    def _open_pair(self, key: str, rank: int, *, init: float, trainable_magnitude: bool = True) -> None:
        for adapter in self.adapters:
            adapter.add_pair(key, rank)
        self.magnitudes.add(key, init, trainable=trainable_magnitude)
        self.current_key = key
        self._sync_layout()

    def _sync_layout(self) -> None:
        for adapter in self.adapters:
            adapter.set_layout(self.frozen_keys, self.current_key)

    def gather_pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task ``key``'s factors over every adapted matrix: B [S,d,r], A [S,r,d], normaliser n [S]."""
        bs = torch.cat([a.lora_B[key].detach() for a in self.adapters])
        as_ = torch.cat([a.lora_A[key].detach() for a in self.adapters])
        norms = torch.cat([a.pair_norms(key) for a in self.adapters])
        return bs, as_, norms

    @torch.no_grad()
    def plan_consolidation(self) -> Decision:
        """Decide how to close the open task (pure: changes nothing). Rank 0 calls this, then broadcasts."""
        key = self.current_key
        if key is None:
            raise RuntimeError("consolidate(): no open task")
        rank = self.adapters[0].lora_A[key].shape[1]
        if self.method == "lora-seq":
            return Decision(task=key, action="kept", rank=rank)
        alpha = self.magnitudes.values[key].detach().double().cpu()
        new_b, new_a, norms = (t.double().cpu() for t in self.gather_pair(key))
        if self.cfg.kd and self.frozen_keys:
            past = [tuple(t.double().cpu() for t in self.gather_pair(k)) for k in self.frozen_keys]
            coeffs, rel = fit_in_span(past, new_b, new_a, per_slot=self.magnitudes.num_slots > 1)
            if rel < self.cfg.kd_threshold:
                past_alphas = self.magnitudes.stacked(self.frozen_keys).detach().double().cpu()
                return plan_absorption(key, alpha, self.frozen_keys, past_alphas, coeffs, rel, rank=rank)
            decision = plan_freeze(key, alpha, norms, preset=self.cfg.preset, rank=rank)
            decision.relative_residual, decision.coefficients = rel, coeffs.tolist()
            return decision
        return plan_freeze(key, alpha, norms, preset=self.cfg.preset, rank=rank)

    @torch.no_grad()
    def apply_consolidation(self, decision: Decision) -> None:
        """Apply a decision (on every rank): freeze or absorb the open pair, set magnitudes."""
        if decision.task != self.current_key:
            raise RuntimeError(f"decision for {decision.task} but the open task is {self.current_key}")
        if decision.action == "kept":
            self.decisions.append(decision.to_dict())
            return  # lora-seq: the single pair stays open
        for key, values in decision.magnitudes.items():
            self.magnitudes.values[key].copy_(torch.tensor(values, dtype=torch.float64))
        if decision.action == "absorbed":
            for adapter in self.adapters:
                adapter.drop_pair(decision.task)
            del self.magnitudes.values[decision.task]
        else:
            self.frozen_keys.append(decision.task)
        self.current_key = None
        self._sync_layout()
        self.decisions.append(decision.to_dict())

    def consolidate(self) -> Decision:
        """Plan and apply in one process (single-process use and tests)."""
        decision = self.plan_consolidation()
        self.apply_consolidation(decision)
        return decision

    # -------------------------------------------------------------------------------------------------------------
    # Merge and layout

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain timm ViT with every adapter folded into ``W0`` and the final head (same graph as the base)."""
        if self.num_tasks == 0:
            raise RuntimeError("merge(): no task trained yet")
        merged = copy.deepcopy(self.backbone)
        for i in self.block_ids:
            wrapper: SDLoRAQKV = self.backbone.blocks[i].attn.qkv
            plain = copy.deepcopy(wrapper.base_layer)
            plain.weight.copy_(wrapper.merged_weight())
            merged.blocks[i].attn.qkv = plain
        weight, bias = self.head.full()
        merged.reset_classifier(weight.shape[0])
        merged.head.weight.copy_(weight)
        merged.head.bias.copy_(bias)
        if self.inference_head is not None:  # ridge: projection, ReLU, one matrix product (plain torch layers)
            merged.head = self.inference_head.plain()
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged.eval()

    def layout(self) -> dict[str, Any]:
        """Structure needed to rebuild an empty model that ``load_state_dict`` fills exactly (JSON)."""
        ranks = {k: int(v.shape[1]) for k, v in self.adapters[0].lora_A.items()}
        return {
            "method": self.method,
            "task_classes": list(self.task_classes),
            "frozen_keys": list(self.frozen_keys),
            "current_key": self.current_key,
            "ranks": ranks,
            "magnitude_trainable": {k: bool(p.requires_grad) for k, p in self.magnitudes.values.items()},
            "decisions": list(self.decisions),
        }

    def restore_layout(self, layout: dict[str, Any]) -> None:
        """Recreate the per-task containers described by ``layout`` (values come from ``load_state_dict``)."""
        if self.num_tasks:
            raise RuntimeError("restore_layout() needs a freshly built model")
        ref = self.backbone.patch_embed.proj.weight
        for t, n in enumerate(layout["task_classes"]):
            self.head.add(task_key(t), n, device=ref.device, dtype=ref.dtype)
        for key, rank in layout["ranks"].items():
            for adapter in self.adapters:
                adapter.add_pair(key, rank)
            self.magnitudes.add(key, 0.0, trainable=layout["magnitude_trainable"][key])
        self.num_tasks = len(layout["task_classes"])
        self.task_classes = list(layout["task_classes"])
        self.frozen_keys = list(layout["frozen_keys"])
        self.current_key = layout["current_key"]
        self.decisions = list(layout.get("decisions", []))
        last = task_key(self.num_tasks - 1) if self.num_tasks else None
        for key in self.head.weight:
            trainable = key == last and self.current_key is not None
            self.head.weight[key].requires_grad_(trainable)
            self.head.bias[key].requires_grad_(trainable)
        self._sync_layout()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict saved from a model of the same layout (strict); adapter post-hooks rebuild the banks."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                "was it written by a run with another model config?"
            )

    def rebuild_derived_state(self) -> None:
        """Recompute the non-persistent banks and normalisers (``load_state_dict`` does it through post-hooks)."""
        for adapter in self.adapters:
            adapter.rebuild_derived_state()


def select_blocks(backbone: nn.Module, adapter_cfg: AdapterConfig) -> list[int]:
    """Indices of the blocks to adapt (all by default); out-of-range ones raise and list what exists."""
    n_blocks = len(backbone.blocks)
    block_ids = list(range(n_blocks)) if adapter_cfg.blocks is None else sorted(set(adapter_cfg.blocks))
    bad = [i for i in block_ids if not 0 <= i < n_blocks]
    if bad:
        names = ", ".join(f"blocks.{i}.attn.qkv" for i in range(n_blocks))
        raise UserError(f"adapter.blocks: {bad} out of range; the model has {names}")
    return block_ids


def inject_adapters(
    backbone: nn.Module, adapter_cfg: AdapterConfig, bank: MagnitudeBank, block_ids: list[int]
) -> None:
    """Replace ``blocks.{i}.attn.qkv`` by :class:`SDLoRAQKV` wrappers sharing the magnitude ``bank`` (PEFT-style)."""
    for j, i in enumerate(block_ids):
        attn = backbone.blocks[i].attn
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise UserError(f"adapter.blocks: blocks.{i}.attn.qkv is not an nn.Linear (got {type(attn.qkv).__name__})")
        attn.qkv = SDLoRAQKV(attn.qkv, bank, j, preset=adapter_cfg.preset, compute=adapter_cfg.compute)


def build_model(cfg: Config) -> SDLoRAViT:
    """Backbone from ``cfg.model`` (seeded by ``cfg.train.seed``), adapters from ``cfg.adapter``; no task yet."""
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    return SDLoRAViT(backbone, cfg.adapter, method=cfg.train.method)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, offset: int, num_classes: int) -> torch.Tensor:
    """Cross-entropy over the current task's logits only (old classes masked out; reference sdlora.py:229-232).

    ``targets`` are global labels in ``[offset, offset + num_classes)``.
    """
    return F.cross_entropy(logits[:, offset : offset + num_classes], targets - offset)


class RidgeHead(nn.Module):
    """``relu(f @ P) @ W^T`` over all seen classes; buffers are not persistent (the task folder holds them)."""

    def __init__(self, projection: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("projection", projection.float().contiguous(), persistent=False)  # [d, M]
        self.register_buffer("weight", weight.float().contiguous(), persistent=False)  # [C, M]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C]."""
        return F.linear(F.relu(features @ self.projection.to(features.dtype)), self.weight.to(features.dtype))

    def plain(self) -> nn.Sequential:
        """The same function from plain torch layers (what export traces)."""
        d, m = self.projection.shape
        first, last = nn.Linear(d, m, bias=False), nn.Linear(m, self.weight.shape[0])
        with torch.no_grad():
            first.weight.copy_(self.projection.T)
            last.weight.copy_(self.weight)
            last.bias.zero_()
        return nn.Sequential(first, nn.ReLU(), last).to(self.projection.device)
