"""Every tensor a module keeps follows ``.to()`` (house style 16), checked by walking everything reachable.

A plain dict of tensors on a module is not moved by ``Module.to()``. On a GPU a ``--resume`` (weights loaded on
CPU, then moved) would then ``torch.cat`` a CPU and a CUDA tensor at the next consolidation. Here a dtype change
(float32 -> float64) and a device change (cpu -> meta) stand in for the GPU: both go through the same ``_apply``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensor_walk import reachable_tensors, wrong_device, wrong_dtype

from sdlora_dist import head_align
from sdlora_dist.export.onnx_export import _HalfPrecision
from sdlora_dist.export.preprocess import InGraphNormalize, normalize
from sdlora_dist.model import SDLoRAViT, build_model, masked_cross_entropy

CLASSES = 3
KD_RR = ("adapter.kd=true", "adapter.kd_threshold=0.05", "adapter.rank_schedule=[[0,4],[2,2]]")


def _randomize_current(model: SDLoRAViT, gen: torch.Generator) -> None:
    """Give the open pair a non-zero B, as training would (B starts at zero)."""
    with torch.no_grad():
        for adapter in model.adapters:
            b = adapter.lora_B[model.current_key]
            b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.05)


def _step(model: SDLoRAViT, gen: torch.Generator) -> None:
    """One SGD step of the open task in the model's dtype."""
    dtype = next(model.parameters()).dtype
    task = model.num_tasks - 1
    offset = model.class_offset(task)
    x = torch.randn(4, 3, 32, 32, generator=gen).to(dtype)
    y = offset + torch.randint(0, CLASSES, (4,), generator=gen)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    masked_cross_entropy(model(x), y, offset, CLASSES).backward()
    opt.step()


def _history(tiny_cfg) -> SDLoRAViT:
    """Tasks 0..2 consolidated (frozen, KD-absorbed, frozen at RR rank 2) and task 3 open after one step."""
    model = build_model(tiny_cfg(*KD_RR))
    gen = torch.Generator().manual_seed(0)
    model.add_task(CLASSES)
    _randomize_current(model, gen)
    assert model.consolidate().action == "frozen"
    model.add_task(CLASSES)
    with torch.no_grad():  # task 1 = 2 x task 0's unit directions: KD folds it into task 0's magnitude
        for adapter in model.adapters:
            adapter.lora_A["task_01"].copy_(adapter.lora_A["task_00"])
            scale = 2 / adapter.pair_norms("task_00")  # [2]: q, v
            adapter.lora_B["task_01"].copy_(adapter.lora_B["task_00"] * scale[:, None, None])
    assert model.consolidate().action == "absorbed"
    model.add_task(CLASSES)
    _randomize_current(model, gen)
    decision = model.consolidate()
    assert (decision.action, decision.rank) == ("frozen", 2)
    model.add_task(CLASSES)
    _step(model, gen)
    return model


def test_history_has_every_kind_of_cached_state(tiny_cfg):
    # The walk must see the derived state it is meant to check, or it could pass by looking at nothing.
    model = _history(tiny_cfg)
    paths = [p for p, _ in reachable_tensors(model)]
    assert any("past_inv_norm" in p for p in paths) and any("past_A" in p for p in paths)
    assert any("magnitudes" in p and "task_00" in p for p in paths)
    assert model.frozen_keys == ["task_00", "task_02"]


def test_model_tensors_follow_dtype_through_consolidation_and_step(tiny_cfg):
    model = _history(tiny_cfg)
    model.to(torch.float64)
    assert wrong_dtype(model, torch.float64) == []
    gen = torch.Generator().manual_seed(1)
    model.consolidate()  # builds the past bank from cached and new normalisers
    model.add_task(CLASSES)  # new pair, magnitude and head rows
    _step(model, gen)
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    assert wrong_dtype(model, torch.float64) == []
    assert wrong_dtype(model.merge(), torch.float64) == []


def test_model_tensors_follow_device(tiny_cfg):
    # ``meta`` is a device like cuda as far as ``Module.to`` is concerned: whatever stays on cpu would stay there.
    model = _history(tiny_cfg)
    model.consolidate()
    model.to("meta")
    assert wrong_device(model, "meta") == []


def test_weights_loaded_then_moved_rebuild_on_the_new_dtype(tiny_cfg):
    # --resume / --continue: an empty model built, filled by load_state_dict on CPU, then moved.
    model = _history(tiny_cfg)
    twin = build_model(tiny_cfg(*KD_RR))
    twin.restore_layout(model.layout())
    twin.load_weights(model.state_dict())
    twin.to(torch.float64)
    twin.consolidate()
    twin.add_task(CLASSES)
    _step(twin, torch.Generator().manual_seed(2))
    assert wrong_dtype(twin, torch.float64) == []


@pytest.mark.parametrize("cov", head_align.COV_MODES)
def test_head_alignment_state(tiny_cfg, cov):
    model = _history(tiny_cfg).to(torch.float64)
    n_cls = model.head.num_classes
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        feats = model.features(torch.randn(3 * n_cls, 3, 32, 32, generator=gen, dtype=torch.float64))
    labels = torch.arange(3 * n_cls) % n_cls
    stats = head_align.finalize(head_align.class_sums(feats, labels, n_cls, cov), cov)
    before = model.head.full()[0].clone()
    weight, bias = head_align.align_head(*model.head.full(), head_align.merge_tasks([stats], cov), epochs=1,
                                         per_class=4, lr=0.5, batch_size=16, generator=gen)  # fmt: skip
    head_align.set_head(model, weight, bias)
    assert not torch.equal(model.head.full()[0], before)
    assert wrong_dtype(model, torch.float64) == []
    # The stored statistics have fixed dtypes whatever the model's (module docstring): counts float64, rest float32.
    result = head_align.AlignResult("gaussian", stats, [0], {})
    stored = {p.split("'")[1]: t.dtype for p, t in reachable_tensors(result)}
    assert stored.pop("count") == torch.float64
    assert stored.pop("dof", torch.float64) == torch.float64
    assert set(stored.values()) == {torch.float32}


def test_onnx_wrappers_follow_dtype(tiny_cfg):
    merged = _history(tiny_cfg).merge()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    wrapped = InGraphNormalize(merged, mean, std).to(torch.float64)
    assert wrong_dtype(wrapped, torch.float64) == []
    with torch.no_grad():
        out = wrapped(torch.from_numpy(images))
        ref = merged(torch.from_numpy(normalize(images, mean, std)).double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    half = _HalfPrecision(merged)
    assert wrong_dtype(half, torch.float16) == []
