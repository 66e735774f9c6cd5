"""SD-LoRA core: adapters, presets, consolidation (RR, KD), merge, checkpoints, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_overrides
from model_helpers import INPUTS, LABELS_PER_TASK, set_current_in_span, train_task
from torch import nn

from sdlora_dist.checkpoint import load_task_model, save_task_checkpoint, write_run_header
from sdlora_dist.config import ConfigError, load_config
from sdlora_dist.errors import UserError
from sdlora_dist.model import build_model


def run_tasks(model, n: int, *, steps: int = 3) -> None:
    for t in range(n):
        if t:
            model.consolidate()
        model.add_task(LABELS_PER_TASK)
        train_task(model, t, steps)


@pytest.mark.slow  # several trained tasks: over 2 s
@pytest.mark.parametrize("compute", ["dense", "lowrank"])
@pytest.mark.parametrize("magnitude", ["shared", "per_layer"])
def test_merge_equals_adapter_model_with_rr_ranks(tiny_cfg, compute, magnitude):
    cfg = tiny_cfg(
        f"adapter.compute={compute}", f"adapter.magnitude={magnitude}", "adapter.rank_schedule=[[0,5],[1,3],[3,2]]"
    )
    model = build_model(cfg)
    run_tasks(model, 4)
    ranks = [a.shape[1] for a in model.adapters[0].lora_A.values()]
    assert ranks == [5, 3, 3, 2]
    merged = model.merge()
    assert type(merged).__name__ == "VisionTransformer"
    assert not any(".lora_" in k or "magnitudes" in k for k in merged.state_dict())
    with torch.no_grad():
        diff = (merged(INPUTS) - model(INPUTS)).abs().max().item()
    assert diff <= 1e-5


class ReferenceQKV(nn.Module):
    """The authors' layer written out from reference-sdlora.md section 1 (a loop over past tasks)."""

    def __init__(self, base: nn.Linear, past: list[tuple], alpha_prev: list[float], cur: tuple, alpha_cur: float):
        super().__init__()
        self.base, self.past, self.alpha_prev, self.cur, self.alpha_cur = base, past, alpha_prev, cur, alpha_cur

    def forward(self, x):
        qkv = self.base(x)
        dim = x.shape[-1]
        out = []
        for p in (0, 1):  # q, v
            delta = torch.zeros_like(qkv[..., :dim])
            for (a, b), alpha in zip(self.past, self.alpha_prev, strict=True):
                norm = torch.norm(b[p]) * torch.norm(a[p])  # product of separate Frobenius norms
                delta = delta + alpha * (x @ a[p].t() @ b[p].t()) / norm
            a_t, b_t = self.cur
            delta = delta + self.alpha_cur * (x @ a_t[p].t() @ b_t[p].t())  # current: not normalised
            out.append(delta)
        return torch.cat((qkv[..., :dim] + out[0], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :] + out[1]), -1)


def test_official_preset_reproduces_reference_arithmetic(tiny_cfg):
    model = build_model(tiny_cfg("adapter.preset=official"))
    run_tasks(model, 2)
    model.consolidate()
    model.add_task(LABELS_PER_TASK)
    # Alphas reset to 0.8 at each task, one scalar per task for every layer and q/v.
    assert all(p.numel() == 1 and p.item() == pytest.approx(0.8) for p in model.magnitudes.values.values())
    train_task(model, 2)
    alphas = {k: p.item() for k, p in model.magnitudes.values.items()}
    reference = copy.deepcopy(model.backbone)
    for i, wrapper in zip(model.block_ids, model.adapters, strict=True):
        past = [(wrapper.lora_A[k].detach(), wrapper.lora_B[k].detach()) for k in ("task_00", "task_01")]
        cur = (wrapper.lora_A["task_02"].detach(), wrapper.lora_B["task_02"].detach())
        reference.blocks[i].attn.qkv = ReferenceQKV(
            copy.deepcopy(wrapper.base_layer), past, [alphas["task_00"], alphas["task_01"]], cur, alphas["task_02"]
        )
    w, b = model.head.full()
    with torch.no_grad():
        expected = reference(INPUTS) @ w.t() + b
        got = model(INPUTS)
    # float32 logits of magnitude ~2: a 1e-6 bound plus 1e-6 relative (a few ulps; the summation order of the two
    # computations differs, and so does the CPU's matmul blocking from machine to machine)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_paper_preset_unit_directions_and_boundary_rule(tiny_cfg):
    model = build_model(tiny_cfg())
    run_tasks(model, 2)
    before = {k: p.detach().clone() for k, p in model.magnitudes.values.items()}
    b, a, norms = model.gather_pair("task_01")
    alpha_t = before["task_01"].item()
    model.consolidate()
    # past magnitudes keep their learned values; the new one is alpha_t * mean_p ||B_p A_p||_F
    assert model.magnitudes.values["task_00"].item() == before["task_00"].item()
    bA = torch.bmm(b, a)
    expected = alpha_t * bA.flatten(1).norm(dim=1).mean().item()
    assert model.magnitudes.values["task_01"].item() == pytest.approx(expected, rel=1e-6)
    # every past direction has unit Frobenius norm
    for wrapper in model.adapters:
        for p in (0, 1):
            scale = wrapper.past_inv_norm[p]
            start = 0
            for key in model.frozen_keys:
                r = wrapper.lora_A[key].shape[1]
                direction = (wrapper.past_B[p][:, start : start + r] * scale[start : start + r]) @ wrapper.past_A[p][
                    start : start + r
                ]
                assert direction.norm().item() == pytest.approx(1.0, abs=1e-5)
                start += r


def test_paper_per_layer_boundary_keeps_function(tiny_cfg):
    model = build_model(tiny_cfg("adapter.magnitude=per_layer"))
    run_tasks(model, 2)
    with torch.no_grad():
        before = model(INPUTS)
        model.consolidate()
        after_consolidate = model(INPUTS)
        model.add_task(LABELS_PER_TASK)  # new pair has B = 0: adds nothing to old logits
        after_add = model(INPUTS)[:, : before.shape[1]]
    assert (after_consolidate - before).abs().max().item() <= 1e-5
    assert (after_add - before).abs().max().item() <= 1e-5


@pytest.mark.slow  # several trained tasks: over 2 s
def test_training_moves_only_current_task_state(tiny_cfg):
    model = build_model(tiny_cfg())
    run_tasks(model, 2)
    model.consolidate()
    model.add_task(LABELS_PER_TASK)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_task(model, 2, steps=2)
    state = model.state_dict()
    moved = {k for k in snapshot if not torch.equal(snapshot[k], state[k])}
    frozen_prefixes = [k for k in snapshot if ".base_layer." in k or (k.startswith("backbone.") and ".lora_" not in k)]
    assert frozen_prefixes and not moved & set(frozen_prefixes)  # W0 bit-identical
    for old in ("task_00", "task_01"):
        assert not {k for k in moved if k.endswith(f"lora_A.{old}") or k.endswith(f"lora_B.{old}")}
        assert f"head.weight.{old}" not in moved and f"head.bias.{old}" not in moved
    for k in snapshot:
        if k.endswith("lora_A.task_02") or k.endswith("lora_B.task_02"):
            assert k in moved
    assert {"magnitudes.values.task_00", "magnitudes.values.task_01", "magnitudes.values.task_02"} <= moved
    assert {"head.weight.task_02", "head.bias.task_02"} <= moved


def test_kd_absorbs_direction_in_span_and_keeps_logits(tiny_cfg):
    model = build_model(tiny_cfg("adapter.kd=true"))
    run_tasks(model, 2)
    model.consolidate()
    model.add_task(LABELS_PER_TASK)
    set_current_in_span(model, {"task_00": 0.7, "task_01": -0.3})
    with torch.no_grad():
        model.magnitudes.values["task_02"].fill_(1.3)
        before = model(INPUTS)
    decision = model.consolidate()
    assert decision.action == "absorbed" and decision.relative_residual < 1e-6
    assert model.frozen_keys == ["task_00", "task_01"]
    assert list(model.adapters[0].lora_A) == ["task_00", "task_01"]
    with torch.no_grad():
        after = model(INPUTS)
    assert (after - before).abs().max().item() <= 1e-5


def test_kd_keeps_orthogonal_direction(tiny_cfg):
    model = build_model(tiny_cfg("adapter.kd=true"))
    run_tasks(model, 2)
    decision = model.consolidate()
    assert decision.action == "frozen" and decision.relative_residual > 0.1
    assert model.frozen_keys == ["task_00", "task_01"]


def test_kd_gram_matches_dense_least_squares():
    from sdlora_dist.consolidate import fit_in_span

    g = torch.Generator().manual_seed(3)
    d, s = 20, 4
    past = []
    for r in (3, 2):
        b, a = torch.randn(s, d, r, generator=g), torch.randn(s, r, d, generator=g)
        past.append((b, a, torch.bmm(b, a).flatten(1).norm(dim=1)))
    nb, na = torch.randn(s, d, 2, generator=g), torch.randn(s, 2, d, generator=g)
    coeffs, rel = fit_in_span(past, nb, na, per_slot=False)
    dirs = torch.stack([(torch.bmm(b, a) / n[:, None, None]).flatten() for b, a, n in past], 1).double()
    target = torch.bmm(nb, na).flatten().double()
    sol = torch.linalg.lstsq(dirs, target[:, None], driver="gelsd").solution[:, 0]
    assert torch.allclose(coeffs[0], sol, atol=1e-8)
    expected_rel = ((dirs @ sol - target).norm() / target.norm()).item()
    assert rel == pytest.approx(expected_rel, rel=1e-6)


def test_save_load_round_trip(tiny_cfg, tmp_path):
    # the paper's head: this test saves no head statistics (ridge runs: tests/test_ridge_head.py)
    cfg = tiny_cfg("adapter.rank_schedule=[[0,4],[2,2]]", "adapter.kd=true", "train.head=linear")
    model = build_model(cfg)
    run_tasks(model, 3)
    write_run_header(tmp_path, cfg, model, {"benchmark": "test"})
    save_task_checkpoint(tmp_path, 2, model, {"task": 2})
    loaded = load_task_model(tmp_path, 2)
    with torch.no_grad():
        assert torch.equal(loaded(INPUTS), model(INPUTS))
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    assert {k: p.requires_grad for k, p in loaded.named_parameters()} == flags
    # training continues identically after load
    loaded.consolidate()
    model.consolidate()
    assert loaded.frozen_keys == model.frozen_keys


def test_lora_seq_keeps_one_pair(tiny_cfg):
    model = build_model(tiny_cfg("train.method=lora-seq"))
    run_tasks(model, 3)
    assert list(model.adapters[0].lora_A) == ["task_00"]
    assert model.head.num_classes == 3 * LABELS_PER_TASK
    with torch.no_grad():
        assert (model.merge()(INPUTS) - model(INPUTS)).abs().max().item() <= 1e-5


def test_lifecycle_guards(tiny_cfg):
    model = build_model(tiny_cfg())
    with pytest.raises(RuntimeError, match="add_task"):
        model(INPUTS)
    with pytest.raises(RuntimeError, match="no task"):
        model.merge()
    model.add_task(3)
    with pytest.raises(RuntimeError, match="consolidate"):
        model.add_task(3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.rank=0", "adapter.rank: must be > 0 (got 0)"),
        ("adapter.rank_schedule=[[0,10],[8,6],[4,8]]", "strictly ascending"),
        ("adapter.rank_schedule=[[1,10]]", "must start at task 0"),
        ("adapter.kd_threshold=1.5", "adapter.kd_threshold: must be in (0, 1) (got 1.5)"),
        ("adapter.kd_threshold=0", "adapter.kd_threshold: must be in (0, 1)"),
        ("adapter.preset=paperr", "adapter.preset: must be one of paper, official"),
        ("adapter.bogus=1", "adapter.bogus: unknown key"),
    ],
)
def test_bad_config_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=tiny_overrides(override))
    assert message in str(err.value)


def test_bad_model_name_and_weights(tmp_path):
    with pytest.raises(UserError, match="unknown timm model 'vit_tiny_patch99'"):
        build_model(load_config(overrides=tiny_overrides("model.name=vit_tiny_patch99")))
    with pytest.raises(UserError, match="model.weights is not set"):
        build_model(load_config(overrides=["model.name=vit_tiny_patch16_224"]))
    with pytest.raises(UserError, match="does not exist"):
        build_model(load_config(overrides=tiny_overrides(f"model.weights={tmp_path}/nope.safetensors")))
    # weights of another width: one clear error naming the mismatch
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=24, num_heads=3)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="shape mismatch"):
        build_model(load_config(overrides=tiny_overrides(f"model.weights={path}")))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_local_weights_load(tmp_path, suffix):
    import timm

    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        pytest.importorskip("numpy")
        _save_big_vision_npz(src, path)
    model = build_model(load_config(overrides=tiny_overrides(f"model.weights={path}")))
    with torch.no_grad():
        src.reset_classifier(0)
        assert torch.allclose(model.features(INPUTS), src(INPUTS), atol=1e-5)


def _save_big_vision_npz(model, path) -> None:
    """Write a timm ViT in the big_vision .npz naming timm's loader reads."""
    import numpy as np

    arrays = {
        "embedding/kernel": model.patch_embed.proj.weight.detach().permute(2, 3, 1, 0).numpy(),
        "embedding/bias": model.patch_embed.proj.bias.detach().numpy(),
        "cls": model.cls_token.detach().numpy(),
        "Transformer/posembed_input/pos_embedding": model.pos_embed.detach().numpy(),
        "Transformer/encoder_norm/scale": model.norm.weight.detach().numpy(),
        "Transformer/encoder_norm/bias": model.norm.bias.detach().numpy(),
    }
    heads = model.blocks[0].attn.num_heads
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        d = blk.attn.qkv.in_features
        arrays[p + "LayerNorm_0/scale"] = blk.norm1.weight.detach().numpy()
        arrays[p + "LayerNorm_0/bias"] = blk.norm1.bias.detach().numpy()
        arrays[p + "LayerNorm_2/scale"] = blk.norm2.weight.detach().numpy()
        arrays[p + "LayerNorm_2/bias"] = blk.norm2.bias.detach().numpy()
        w, b = blk.attn.qkv.weight.detach(), blk.attn.qkv.bias.detach()
        for j, name in enumerate(("query", "key", "value")):
            wj = w[j * d : (j + 1) * d].t().reshape(d, heads, d // heads)
            arrays[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = wj.numpy()
            arrays[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = (
                b[j * d : (j + 1) * d].reshape(heads, -1).numpy()
            )
        arrays[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            blk.attn.proj.weight.detach().t().reshape(heads, d // heads, d).numpy()
        )
        arrays[p + "MultiHeadDotProductAttention_1/out/bias"] = blk.attn.proj.bias.detach().numpy()
        for k, fc in ((0, blk.mlp.fc1), (1, blk.mlp.fc2)):
            arrays[p + f"MlpBlock_3/Dense_{k}/kernel"] = fc.weight.detach().t().numpy()
            arrays[p + f"MlpBlock_3/Dense_{k}/bias"] = fc.bias.detach().numpy()
    np.savez(path, **arrays)


def test_magnitude_math_is_finite(tiny_cfg):
    model = build_model(tiny_cfg())
    run_tasks(model, 2, steps=1)
    model.consolidate()
    assert all(math.isfinite(v) for p in model.magnitudes.values.values() for v in p.tolist())


def test_config_reference_is_generated_from_the_classes():
    """docs/config.md must be exactly what ``sdlora config-docs`` prints (regenerate it when config.py changes)."""
    from pathlib import Path

    from sdlora_dist.config import config_reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == config_reference() + "\n", "run: sdlora config-docs --out docs/config.md"
    for key in ("adapter.preset", "adapter.kd_threshold", "train.checkpoint_every", "data.normalize"):
        assert f"`{key}`" in docs.read_text()
