"""What a local weights file says about the ViT it belongs to: its tensors, and its architecture.

The architecture comes from a timm ``config.json`` beside the file (``architecture``, ``model_args``,
``pretrained_cfg.input_size``, as ``timm.models.push_to_hf_hub``/``save_for_hf`` write it) and from the shapes the
state dict fixes: embedding width and patch size (``patch_embed.proj.weight``), depth (``blocks.N``), MLP ratio
(``fc1``), image size (``pos_embed`` tokens x patch size). The head count is not in any shape (qkv is
``[3 * width, width]`` whatever the split): it is taken from ``model_args``, else from the timm name's default when
the width matches it, else by timm's ViT convention of 64 channels per head; ``model.kwargs`` overrides it.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlora_dist.config import ModelConfig
from sdlora_dist.errors import UserError

HEAD_DIM = 64  # timm's ViT widths (tiny 192/3, small 384/6, base 768/12, large 1024/16) all use 64 per head
# the timm name whose defaults match a width (a readable name for an inferred architecture; kwargs fix the rest)
NAME_BY_WIDTH = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
}
OWN_KWARGS = ("num_classes",)  # build_backbone sets these itself (no classifier), whatever the file was saved with
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain torch state dict (``state_dict``/``model``/``module`` unwrapped).

    Unsafe pickles (code, custom objects) are refused unread.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with warnings.catch_warnings():  # a plain pickle makes torch warn before it refuses: one line, ours
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that on.
        raise UserError(
            f"model.weights: {path} is a pickle that holds more than tensors (code or custom objects) and was "
            "refused unread; pass a .safetensors file or a plain state dict of tensors"
        ) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"model.weights: {path} does not hold a state dict (got {type(state).__name__})")
    return state


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the file (a safetensors header is read without loading the tensors)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    try:
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items() if isinstance(v, torch.Tensor)}
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"model.weights: cannot read {path}: {str(exc).splitlines()[0]}") from exc


@dataclass
class Geometry:
    """What the state dict fixes: width, depth, MLP ratio, patch size, image size (None where it cannot tell)."""

    embed_dim: int
    depth: int
    patch_size: int
    img_size: int | None
    mlp_ratio: float | None
    switches: dict[str, Any] = field(default_factory=dict)  # create_model kwargs that tensors present/absent fix


def geometry_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Geometry | None:
    """The ViT geometry the shapes fix; None when they are not a timm ViT's (no ``patch_embed.proj.weight``)."""
    proj = shapes.get("patch_embed.proj.weight")  # [width, 3, patch, patch]
    if proj is None or len(proj) != 4:
        return None
    width, patch = proj[0], proj[-1]
    depth = len({m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")  # [hidden, width]
    img, switches = None, _switches(shapes)
    pos = shapes.get("pos_embed")  # [1, prefix + grid_h * grid_w, width]
    if pos is not None and len(pos) == 3:
        prefix = int("cls_token" in shapes) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
        for tokens in (pos[1] - prefix, pos[1]):  # pos_embed holds the prefix tokens unless no_embed_class
            side = math.isqrt(tokens)
            if side * side == tokens:
                img = side * patch
                if tokens == pos[1] and prefix:
                    switches["no_embed_class"] = True
                break
    return Geometry(width, depth, patch, img, fc1[0] / width if fc1 else None, switches)


def _switches(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Options of timm's VisionTransformer that decide which tensors exist (defaults left out)."""
    found: dict[str, Any] = {}
    if "fc_norm.weight" in shapes and "norm.weight" not in shapes:  # timm norms after pooling for avg pooling
        found["global_pool"] = "avg"
    if "cls_token" not in shapes:
        found["class_token"] = False
    if "reg_token" in shapes:
        found["reg_tokens"] = shapes["reg_token"][1]
    if "blocks.0.attn.qkv.weight" in shapes and "blocks.0.attn.qkv.bias" not in shapes:
        found["qkv_bias"] = False
    return found


@dataclass
class Architecture:
    """A timm model name and ``create_model`` kwargs, with where each fact came from (printed, kept in run.json)."""

    name: str
    kwargs: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: ``vit_tiny_patch16_224 img_size=48 (pos_embed), ...``."""
        facts = [f"name {self.name} ({self.sources.get('name', 'config')})"]
        facts += [f"{k}={v} ({self.sources.get(k, 'config')})" for k, v in self.kwargs.items()]
        return ", ".join(facts)


def beside_config(path: Path) -> dict[str, Any]:
    """The timm/Hugging Face ``config.json`` beside a weights file ({} when there is none or it is not an object)."""
    beside = path.parent / "config.json"
    if not beside.is_file():
        return {}
    try:
        raw = json.loads(beside.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model.weights: {beside} beside the weights is not valid JSON ({exc})") from exc
    return raw if isinstance(raw, dict) else {}


def _default_heads(name: str, width: int) -> int | None:
    """The head count of timm's ``name`` when its default width is ``width`` (None otherwise)."""
    return HEADS_BY_WIDTH.get(width) if NAME_BY_WIDTH.get(width, "").split("_patch")[0] in name else None


def weights_architecture(path: str | Path) -> Architecture | None:
    """The architecture of a local weights file (config.json beside it, then its shapes); None when unknown."""
    path = Path(path)
    if path.suffix.lower() == ".npz" or not path.is_file():
        return None  # big_vision .npz names differ; a missing file is reported when loading
    raw = beside_config(path)
    geometry = geometry_from_shapes(tensor_shapes(path))
    arch_name = raw.get("architecture") if isinstance(raw.get("architecture"), str) else None
    model_args = raw.get("model_args") if isinstance(raw.get("model_args"), dict) else {}
    model_args = {k: v for k, v in model_args.items() if k not in OWN_KWARGS}
    if arch_name is None and geometry is None:
        return None
    here = "config.json"
    arch = Architecture(arch_name or "", dict(model_args), {k: f"{here} model_args" for k in model_args})
    if arch_name:
        arch.sources["name"] = f"{here} architecture"
    if geometry is not None:
        _fill_from_geometry(arch, geometry, raw)
    elif "img_size" not in arch.kwargs and _input_size(raw):
        arch.kwargs["img_size"], arch.sources["img_size"] = _input_size(raw), f"{here} pretrained_cfg.input_size"
    return arch


def _input_size(raw: dict[str, Any]) -> int | None:
    pcfg = raw.get("pretrained_cfg")
    size = pcfg.get("input_size") if isinstance(pcfg, dict) else None
    return int(size[-1]) if isinstance(size, list) and size else None


def _fill_from_geometry(arch: Architecture, geo: Geometry, raw: dict[str, Any]) -> None:
    """Add what the shapes fix and ``model_args`` does not say; a name and heads when config.json has none."""
    shapes = "state dict shapes"
    if not arch.name:
        arch.name = NAME_BY_WIDTH.get(geo.embed_dim, "vit_base_patch16_224")
        arch.sources["name"] = f"nearest timm name for width {geo.embed_dim}"
    facts: dict[str, tuple[Any, str]] = {
        "embed_dim": (geo.embed_dim, f"{shapes}: patch_embed.proj.weight"),
        "depth": (geo.depth, f"{shapes}: blocks.0..{geo.depth - 1}"),
        "patch_size": (geo.patch_size, f"{shapes}: patch_embed.proj.weight"),
    }
    # pos_embed before input_size: a config.json dumped from model.pretrained_cfg keeps the name's default (224)
    # when the model was created at another img_size, while pos_embed is what the weights were trained at
    if geo.img_size is not None:
        facts["img_size"] = (geo.img_size, f"{shapes}: pos_embed tokens x patch size")
    elif _input_size(raw):
        facts["img_size"] = (_input_size(raw), "config.json pretrained_cfg.input_size")
    if geo.mlp_ratio is not None and geo.mlp_ratio != 4.0:
        facts["mlp_ratio"] = (geo.mlp_ratio, f"{shapes}: blocks.0.mlp.fc1.weight")
    facts |= {key: (value, f"{shapes}: which tensors exist") for key, value in geo.switches.items()}
    heads = _default_heads(arch.name, geo.embed_dim)
    if heads is not None:
        facts["num_heads"] = (heads, f"default of {arch.name} (not in any shape)")
    elif geo.embed_dim % HEAD_DIM == 0:
        facts["num_heads"] = (geo.embed_dim // HEAD_DIM, f"width / {HEAD_DIM} per head (not in any shape)")
    for key, (value, source) in facts.items():
        if key not in arch.kwargs:
            arch.kwargs[key], arch.sources[key] = value, source


def embedding_mismatch(shapes: dict[str, tuple[int, ...]], backbone: Any) -> tuple[str, str, str] | None:
    """(file size, model size, matching --set) when the file's patch or image size differ from the model's, else None.

    timm's checkpoint filter would resample the patch and position embeddings silently; callers refuse instead.
    """
    geometry = geometry_from_shapes(shapes)
    if geometry is None:
        return None
    model_patch = int(backbone.patch_embed.patch_size[0])
    model_img = int(backbone.patch_embed.img_size[0])
    pos = shapes.get("pos_embed")
    same_grid = pos is None or len(pos) != 3 or pos[1] == backbone.pos_embed.shape[1]  # tokens; width is checked later
    if geometry.patch_size == model_patch and same_grid:
        return None
    file_img = geometry.img_size or model_img
    return (
        f"{file_img} px images in {geometry.patch_size} px patches",
        f"{model_img} px in {model_patch} px patches",
        f"--set 'model.kwargs={{img_size: {file_img}, patch_size: {geometry.patch_size}}}'",
    )


def fill_architecture_from_weights(
    model_cfg: ModelConfig, *, user_name: str | None, user_kwargs: dict[str, Any] | None
) -> tuple[ModelConfig, str | None]:
    """``model_cfg`` with model.name/model.kwargs from the weights file, and one line saying what and from where.

    What the user gave (``--set`` or ``--config``: ``user_name``, ``user_kwargs``) wins key by key; a recipe's
    name and kwargs do not count (they name the paper's backbone) and are replaced. A size the user sets that the
    file does not have is refused when loading, unless model.resize_embeddings.
    """
    if model_cfg.weights in (None, "hub", "random"):
        return model_cfg, None
    arch = weights_architecture(model_cfg.weights)
    if arch is None:
        return model_cfg, None
    if user_name is not None:
        arch.name, arch.sources["name"] = user_name, "model.name"
    for key, value in (user_kwargs or {}).items():
        arch.kwargs[key], arch.sources[key] = value, "model.kwargs"
    line = f"architecture of {model_cfg.weights}: {arch.describe()}; --set model.name/model.kwargs.KEY overrides"
    return model_cfg.model_copy(update={"name": arch.name, "kwargs": arch.kwargs}), line


def architecture_record(model_cfg: ModelConfig, backbone: Any) -> dict[str, Any]:
    """What ``run.json`` keeps: the timm name and kwargs in force, the built model's geometry, and the sources."""
    arch = weights_architecture(model_cfg.weights) if model_cfg.weights not in (None, "hub", "random") else None
    sources = {"name": "model.name"} | {k: "model.kwargs" for k in model_cfg.kwargs}
    if arch is not None:  # what the file says and the config still holds came from the file
        sources |= {k: arch.sources[k] for k in arch.sources if _same(arch, model_cfg, k)}
    return {
        "name": model_cfg.name,
        "kwargs": dict(model_cfg.kwargs),
        "embed_dim": int(backbone.embed_dim),
        "depth": len(backbone.blocks),
        "num_heads": int(backbone.blocks[0].attn.num_heads),
        "patch_size": int(backbone.patch_embed.patch_size[0]),
        "img_size": int(backbone.patch_embed.img_size[0]),
        "sources": sources,
    }


def _same(arch: Architecture, model_cfg: ModelConfig, key: str) -> bool:
    if key == "name":
        return arch.name == model_cfg.name
    return key in model_cfg.kwargs and arch.kwargs.get(key) == model_cfg.kwargs[key]
