"""Weights files as timm writes them, for the own-weights tests: a 48 px / 8 px-patch ViT-Tiny (2 blocks), random
init, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

from data_fixtures import save_image

OWN_CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
NEW_CLASSES = ("owl", "yak")


def write_timm_weights(folder: Path, *, config_json: bool = True) -> Path:
    """``folder/model.safetensors`` (+ ``config.json``) written by timm's ``save_for_hf`` from a ViT-Tiny at 48 px,
    8 px patches, 2 blocks; without ``config_json`` only the tensors remain."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    import sdlora_dist  # noqa: F401  (torchvision compat before timm builds a model)

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48, patch_size=8, depth=2)
    save_for_hf(model, str(folder), safe_serialization=True)
    if not config_json:
        (folder / "config.json").unlink()
    return folder / "model.safetensors"


def write_class_folders(root: Path, classes: tuple[str, ...], *, first_label: int = 0) -> None:
    """``root/train/<class>/NN.png|jpg`` (6 each) and ``root/test/<class>/NN.png|jpg`` (2 each), 52 x 44 px."""
    for label, name in enumerate(classes, start=first_label):
        for split, count, first in (("train", 6, 0), ("test", 2, 50)):
            for i in range(count):
                ext = "png" if i % 2 == 0 else "jpg"
                save_image(root / split / name / f"{i:02d}.{ext}", label, first + i, size=(52, 44))
