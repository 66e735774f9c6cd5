"""``sdlora export --format timm OUT_DIR``: the merged model as a folder timm loads by itself.

The folder follows timm's own Hugging Face layout (what ``timm.models.push_to_hf_hub`` writes): ``model.safetensors``
(the plain ViT's state dict, adapters folded into the weights) and ``config.json`` (``architecture``, ``num_classes``,
``label_names``, ``model_args``, and ``pretrained_cfg`` with mean/std, input size, crop and interpolation). Either::

    timm.create_model("local-dir:OUT_DIR", pretrained=True)
    cfg = json.load(open("OUT_DIR/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="OUT_DIR/model.safetensors"))

gives the exported classifier, and ``timm.data.resolve_data_config(model=m)`` its preprocessing. (The overlay must
carry ``num_classes``: with the architecture's default of 1000, timm would drop the exported head.) Only runs with the
paper's linear head (``train.head=linear``) can be written: a ridge head is not a layer timm's ViT has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdlora_dist.checkpoint import RunState
from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_dir

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def timm_config(state: RunState, metadata: dict[str, Any], num_features: int) -> dict[str, Any]:
    """The ``config.json`` timm reads for ``state``'s merged model (``metadata``: the ONNX export's)."""
    num_classes = len(metadata["class_names"])
    model_args = {**state.config.model.kwargs, "num_classes": num_classes}
    pretrained_cfg = {
        "input_size": list(metadata["input_size"]), "fixed_input_size": True,
        "interpolation": metadata["interpolation"], "crop_pct": float(metadata["crop_pct"]), "crop_mode": "center",
        "mean": list(metadata["mean"]), "std": list(metadata["std"]), "num_classes": num_classes,
        "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
    }  # fmt: skip
    return {
        "architecture": state.config.model.name, "num_classes": num_classes, "num_features": num_features,
        "global_pool": getattr(state.model.backbone, "global_pool", "token"), "model_args": model_args,
        "pretrained_cfg": pretrained_cfg, "label_names": list(metadata["class_names"]),
    }  # fmt: skip


def write_timm_folder(out_dir: str | Path, state: RunState, metadata: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of the merged model into ``out_dir`` atomically (the folder
    appears complete or not at all); refuses a folder that holds other files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if state.config.train.head != "linear":
        raise UserError(
            f"--format timm needs the paper's linear head, but this run was trained with train.head="
            f"{state.config.train.head} (a random projection, ReLU and ridge layer that timm's ViT head cannot hold): "
            "export ONNX instead (sdlora export model.onnx), or train with --set train.head=linear"
        )
    if out.exists() and (not out.is_dir() or any(p.name not in _OWN for p in out.iterdir())):
        raise UserError(f"{out} exists and is not an export folder: pass a new folder for --format timm")
    merged = state.model.merge()
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in merged.state_dict().items()}
    config = timm_config(state, metadata, int(merged.num_features))

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    atomic_dir(out, fill)
    return out


_OWN = {WEIGHTS_FILE, CONFIG_FILE, "README.md"}

