"""Adapter cost against the number of past tasks (issue 2, "Must measure").

One process measures, for every config, the train-step time (forward + masked CE + backward + SGD step on the
trainable parameters) and the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
deterministic). Configs: a frozen backbone (linear head only), plain LoRA (rank 10 on q and v, x -> A -> B, scaling
1), SD-LoRA with ``adapter.compute=dense`` and ``lowrank`` at T past tasks, and the reference code's per-task loop
(``bench/reference_loop.py``) at the same T. Configs are interleaved over rounds and medians are taken, because
machines are noisy; ratios are quoted against the issue's targets.

    python bench/bench_adapters.py                      # CPU: ViT-S/16, batch 16, fp32, 2 threads (~6 min)
    python bench/bench_adapters.py --quick              # tiny model smoke run (< 30 s)
    python bench/bench_adapters.py --device cuda --dtype bf16 --batch 128 --model vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import inject_reference_loop  # noqa: E402

from sdlora_dist.config import load_config  # noqa: E402  (import sdlora_dist before timm: torchvision compat)
from sdlora_dist.model import SDLoRAViT, build_backbone, build_model, masked_cross_entropy  # noqa: E402

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20
KINDS = ("frozen", "lora", "dense", "reference", "lowrank", "folded")


# ---------------------------------------------------------------------------------------------------------------------
# Plain LoRA (the comparison point): rank r on q and v of the fused qkv, x -> A -> B, scaling 1


class LoRAQKV(nn.Module):
    """Standard LoRA on the q and v slices of a frozen fused qkv linear (B starts small, not zero: timing only)."""

    def __init__(self, base_layer: nn.Linear, rank: int) -> None:
        super().__init__()
        d = base_layer.in_features
        self.base_layer, self.dim = base_layer, d
        self.A_q, self.A_v = nn.Linear(d, rank, bias=False), nn.Linear(d, rank, bias=False)
        self.B_q, self.B_v = nn.Linear(rank, d, bias=False), nn.Linear(rank, d, bias=False)
        for b in (self.B_q, self.B_v):
            nn.init.normal_(b.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d] -> qkv [..., 3d]; the branch outputs are added in place into the q and v slices."""
        qkv = self.base_layer(x)
        d = self.dim
        qkv[..., :d] += self.B_q(self.A_q(x))
        qkv[..., 2 * d :] += self.B_v(self.A_v(x))
        return qkv


class HeadOnly(nn.Module):
    """A frozen backbone and a trainable linear head (the floor: no adapter at all)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen features."""
        return self.head(self.backbone(x))


# ---------------------------------------------------------------------------------------------------------------------
# Prototype of the recommended kernel ("fold"): forward through the folded weight W0 + dW (one GEMM, like the base
# layer), backward computes only what trains -- grad x, the alphas' per-column scales and the current pair -- by
# whichever route is cheaper: low-rank (2 N d R' per projection) or through G^T X (N d^2 per projection, q and v
# rows only, never the k rows). Nothing but x and the merged weight is saved, so saved bytes do not grow with T.


def _concat(a_past: torch.Tensor, b_past: torch.Tensor, s_past: torch.Tensor, a_cur: torch.Tensor,
            b_cur: torch.Tensor, s_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Past bank + current pair -> A_all [2, R', d], B_all [2, d, R'], per-column scale [2, R']."""
    scale = torch.cat((s_past, s_cur[:, None].expand(2, a_cur.shape[1])), 1)
    return torch.cat((a_past, a_cur), 1), torch.cat((b_past, b_cur), 2), scale


class _FoldedQV(torch.autograd.Function):
    """qkv = x W^T + b with W = W0 + pad(B_all diag(s) A_all): q/v rows adapted; grads for x, s, A_t, B_t only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_past: torch.Tensor,
                b_past: torch.Tensor, s_past: torch.Tensor, a_cur: torch.Tensor, b_cur: torch.Tensor,
                s_cur: torch.Tensor) -> torch.Tensor:  # fmt: skip
        d = weight.shape[1]
        a_all, b_all, scale = _concat(a_past, b_past, s_past, a_cur, b_cur, s_cur)
        delta = torch.bmm(b_all * scale[:, None, :], a_all)  # [2, d, d]
        merged = torch.cat((weight[:d] + delta[0], weight[d : 2 * d], weight[2 * d :] + delta[1]))  # [3d, d]
        # Save the inputs, not their concatenation: the bank is a buffer, so saving it costs no new memory.
        ctx.save_for_backward(x, merged, a_past, b_past, s_past, a_cur, b_cur, s_cur)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, *factors = ctx.saved_tensors
        a_all, b_all, scale = _concat(*factors)
        d, r_cur = merged.shape[1], factors[3].shape[1]
        grad_x = grad @ merged
        g2, x2 = grad.reshape(-1, 3 * d), x.reshape(-1, d)  # [N, 3d], [N, d]
        dense_route = 2 * a_all.shape[1] >= d
        g_scale, g_a, g_b = [], [], []
        for p, rows in ((0, slice(0, d)), (1, slice(2 * d, 3 * d))):
            g = g2[:, rows]  # [N, d]
            if dense_route:
                m = g.t() @ x2  # [d, d] = dL/d(delta_p)
                ma = m @ a_all[p].t()  # [d, R']
                g_scale.append((ma * b_all[p]).sum(0))
                g_b.append(ma[:, -r_cur:] * scale[p, -r_cur:])
                g_a.append((b_all[p].t() @ m)[-r_cur:] * scale[p, -r_cur:, None])
            else:
                xa, gb = x2 @ a_all[p].t(), g @ b_all[p]  # [N, R'] each
                g_scale.append((xa * gb).sum(0))
                g_b.append((g.t() @ xa[:, -r_cur:]) * scale[p, -r_cur:])
                g_a.append((gb[:, -r_cur:].t() @ x2) * scale[p, -r_cur:, None])
        g_scale_t = torch.stack(g_scale)  # [2, R']
        g_s_past, g_s_cur = g_scale_t[:, :-r_cur], g_scale_t[:, -r_cur:].sum(1)
        return grad_x, None, None, None, None, g_s_past, torch.stack(g_a), torch.stack(g_b), g_s_cur


def folded_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Drop-in ``SDLoRAQKV.forward`` for an open task (prototype; bound per instance by :func:`use_folded`)."""
    key, w = self.current_key, self.base_layer.weight
    if self.frozen_keys:
        a_past, b_past, s_past = self.past_A, self.past_B, self._past_scales().to(w.dtype)
    else:
        a_past, b_past, s_past = w.new_empty(2, 0, self.dim), w.new_empty(2, self.dim, 0), w.new_empty(2, 0)
    s_cur = self._current_alpha().to(w.dtype)
    return _FoldedQV.apply(
        x, w, self.base_layer.bias, a_past, b_past, s_past, self.lora_A[key], self.lora_B[key], s_cur
    )


def use_folded(model: SDLoRAViT) -> SDLoRAViT:
    """Bind :func:`folded_forward` on every adapter of ``model`` (which must have an open task)."""
    for adapter in model.adapters:
        adapter.forward = types.MethodType(folded_forward, adapter)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Config builders


@dataclass
class Case:
    """One benchmarked configuration and its measurements."""

    name: str
    kind: str  # frozen | lora | dense | lowrank | reference
    past: int | None
    model: nn.Module
    offset: int
    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)
    saved: dict[str, int] = field(default_factory=dict)
    peak_step_bytes: list[int] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def _overrides(args: argparse.Namespace, compute: str = "dense", preset: str = "paper") -> list[str]:
    sets = [f"model.name={args.model}", "model.weights=random", f"adapter.compute={compute}"]
    sets += [f"adapter.preset={preset}", f"adapter.rank={args.rank}"]
    if args.quick:
        sets.append("model.kwargs=" + json.dumps(TINY_KWARGS))
    return sets


def build_sdlora(args: argparse.Namespace, compute: str, past: int, preset: str = "paper") -> SDLoRAViT:
    """SD-LoRA model with ``past`` consolidated tasks (non-zero random B) and an open current task."""
    model = build_model(load_config(overrides=_overrides(args, compute, preset)))
    gen = torch.Generator().manual_seed(1234)
    for _ in range(past):
        model.add_task(args.classes)
        with torch.no_grad():
            for adapter in model.adapters:
                b = adapter.lora_B[model.current_key]
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        model.consolidate()
    model.add_task(args.classes)
    return model


def reference_from(model: SDLoRAViT) -> nn.Module:
    """The same model (same factors, magnitudes and head) with every qkv wrapper replaced by the per-task loop."""
    ref = copy.deepcopy(model)
    keys = ref.frozen_keys + [ref.current_key]
    alphas = nn.ParameterList([nn.Parameter(ref.magnitudes.values[k].detach()[:1].clone()) for k in keys])
    ref.magnitudes.requires_grad_(False)
    past = [[(a.lora_A[k].detach(), a.lora_B[k].detach()) for k in ref.frozen_keys] for a in ref.adapters]
    cur = [(a.lora_A[ref.current_key].detach(), a.lora_B[ref.current_key].detach()) for a in ref.adapters]
    for j, adapter in enumerate(ref.adapters):
        ref.backbone.blocks[j].attn.qkv = adapter.base_layer
    inject_reference_loop(ref.backbone, past, cur, alphas)
    ref.ref_alphas = alphas
    return ref


def build_plain(args: argparse.Namespace, lora: bool) -> nn.Module:
    """Frozen backbone plus head; with ``lora`` also rank-r LoRA on q and v of every block."""
    cfg = load_config(overrides=_overrides(args))
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    backbone.requires_grad_(False)
    if lora:
        for blk in backbone.blocks:
            blk.attn.qkv = LoRAQKV(blk.attn.qkv, args.rank)
    return HeadOnly(backbone, args.classes)


def build_cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Every config of ``args.kinds``, on ``device`` in ``dtype``, with its SGD optimizer."""
    want = set(args.kinds) - (set() if not args.no_prototype else {"folded"})
    cases = [Case(k, k, None, build_plain(args, lora=k == "lora"), 0) for k in ("frozen", "lora") if k in want]
    for past in args.past:
        offset = past * args.classes
        if want & {"dense", "reference"}:
            dense = build_sdlora(args, "dense", past)
            if "dense" in want:
                cases.append(Case(f"dense T={past}", "dense", past, dense, offset))
            if "reference" in want:
                cases.append(Case(f"reference T={past}", "reference", past, reference_from(dense), offset))
        if "lowrank" in want:
            cases.append(Case(f"lowrank T={past}", "lowrank", past, build_sdlora(args, "lowrank", past), offset))
        if "folded" in want:
            cases.append(
                Case(f"folded T={past}", "folded", past, use_folded(build_sdlora(args, "dense", past)), offset)
            )
    for case in cases:
        case.model.to(device=device, dtype=dtype)
        params = [p for p in case.model.parameters() if p.requires_grad]
        case.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


def train_step(case: Case, x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """Forward, masked CE over the current task's classes, backward, SGD step."""
    case.optimizer.zero_grad(set_to_none=True)
    loss = masked_cross_entropy(case.model(x), y + case.offset, case.offset, classes)
    loss.backward()
    case.optimizer.step()
    return loss


def count_saved(case: Case, x: torch.Tensor, y: torch.Tensor, classes: int) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward + loss (no backward run; the graph is dropped).

    ``activations``: every saved tensor whose storage is not a parameter or buffer of the model, summed over every
    save (numel * element_size; a tensor saved twice counts twice). ``activations_unique``: the same tensors counted
    once per storage (the memory really held). ``params``: saves that reference parameter/buffer storage (no new
    memory; reported apart, not counted in ``activations``).
    """
    own = {t.untyped_storage().data_ptr() for t in list(case.model.parameters()) + list(case.model.buffers())}
    totals = {"activations": 0, "params": 0, "count": 0}
    unique: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        ptr = t.untyped_storage().data_ptr()
        totals["count"] += 1
        if ptr in own:
            totals["params"] += nbytes
        else:
            totals["activations"] += nbytes
            unique[ptr] = t.untyped_storage().nbytes()
        # A detached alias keeps the storage alive (pointers stay unique within the forward) without the
        # reference cycle that returning a saved *output* itself would create (it would leak the graph).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = masked_cross_entropy(case.model(x), y + case.offset, case.offset, classes)
    del loss
    return {**totals, "activations_unique": sum(unique.values())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(case: Case, x: torch.Tensor, y: torch.Tensor, classes: int, device: torch.device) -> None:
    """One train step, timed (synchronised on CUDA, with the step's peak memory above what was allocated)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    train_step(case, x, y, classes)
    _sync(device)
    case.times_s.append(time.perf_counter() - start)
    case.cpu_times_s.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        case.peak_step_bytes.append(torch.cuda.max_memory_allocated(device) - before)


def run_rounds(cases: list[Case], args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    """Interleave the configs: each round visits every config (rotated order), warm-up steps then timed steps."""
    from tqdm import tqdm

    device = x.device
    total = len(cases) * (args.warmup + args.rounds * (args.visit_warmup + args.steps))
    with tqdm(total=total, desc="train steps", file=sys.stderr, leave=False) as bar:
        for case in cases:  # first-touch warm-up: momentum buffers, allocator, kernels
            for _ in range(args.warmup):
                train_step(case, x, y, args.classes)
                bar.update()
        _sync(device)
        for r in range(args.rounds):
            shift = (r * len(cases)) // args.rounds
            order = cases[shift:] + cases[:shift]
            for case in order if r % 2 == 0 else order[::-1]:
                for _ in range(args.visit_warmup):
                    train_step(case, x, y, args.classes)
                    bar.update()
                for _ in range(args.steps):
                    timed_step(case, x, y, args.classes, device)
                    bar.update()


def iqr(values: list[float]) -> float:
    """Inter-quartile range (0 with fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


# ---------------------------------------------------------------------------------------------------------------------
# Sanity: the baseline computes the same function as the SD-LoRA layer (official preset = the reference's math)


def check_reference_matches(args: argparse.Namespace) -> dict[str, float]:
    """Tiny model, official preset, 2 past tasks: max |logit diff| of dense and lowrank vs the per-task loop."""
    tiny = argparse.Namespace(**{**vars(args), "quick": True})
    torch.manual_seed(0)
    x = torch.randn(4, 3, TINY_KWARGS["img_size"], TINY_KWARGS["img_size"])
    out = {}
    for compute in ("dense", "lowrank"):
        model = build_sdlora(tiny, compute, past=2, preset="official")
        with torch.no_grad():
            for adapter in model.adapters:  # give the current pair a direction too
                adapter.lora_B[model.current_key].normal_(std=0.02)
            out[compute] = (model(x) - reference_from(model)(x)).abs().max().item()
    return out


def check_folded_matches(args: argparse.Namespace) -> dict[str, float]:
    """Tiny model: logits and every trainable gradient of the folded prototype vs ``compute=dense`` (max abs diff).

    T=0 takes the low-rank gradient route (2 R' < d), T=3 the dense one.
    """
    tiny = argparse.Namespace(**{**vars(args), "quick": True})
    torch.manual_seed(0)
    x = torch.randn(4, 3, TINY_KWARGS["img_size"], TINY_KWARGS["img_size"])
    y = torch.randint(0, args.classes, (4,))
    out = {}
    for past in (0, 3):
        results = []
        for folded in (False, True):
            model = build_sdlora(tiny, "dense", past)
            with torch.no_grad():
                for adapter in model.adapters:  # deterministic non-zero B so every gradient is non-zero
                    b = adapter.lora_B[model.current_key]
                    b.copy_(torch.linspace(-0.05, 0.05, b.numel()).view_as(b))
            if folded:
                use_folded(model)
            logits = model(x)
            masked_cross_entropy(logits, y + past * args.classes, past * args.classes, args.classes).backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((logits.detach(), grads))
        (l0, g0), (l1, g1) = results
        out[f"T={past} logits"] = (l0 - l1).abs().max().item()
        out[f"T={past} grads"] = max((a - b).abs().max().item() for a, b in zip(g0, g1, strict=True))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report


def summarize(case: Case) -> dict[str, Any]:
    """Median and IQR of the step time (wall and process CPU), saved bytes, CUDA step peak."""
    row = {
        "name": case.name,
        "kind": case.kind,
        "past_tasks": case.past,
        "median_step_s": statistics.median(case.times_s) if case.times_s else float("nan"),
        "iqr_step_s": iqr(case.times_s),
        "step_times_s": case.times_s,
        "median_step_cpu_s": statistics.median(case.cpu_times_s) if case.cpu_times_s else float("nan"),
        "iqr_step_cpu_s": iqr(case.cpu_times_s),
        "saved_activation_bytes": case.saved["activations"],
        "saved_activation_bytes_unique": case.saved["activations_unique"],
        "saved_param_buffer_bytes": case.saved["params"],
        "saved_tensor_count": case.saved["count"],
        "trainable_params": sum(p.numel() for p in case.model.parameters() if p.requires_grad),
    }
    if case.peak_step_bytes:
        row["cuda_step_peak_bytes_median"] = int(statistics.median(case.peak_step_bytes))
    return row


def _check(value: float, target: str, ok: bool) -> dict[str, Any]:
    return {"value": value, "target": target, "pass": bool(ok)}


def targets(rows: dict[str, dict[str, Any]], past: list[int], bytes_key: str, time_key: str | None) -> dict[str, Any]:
    """The issue's targets for each kernel, from ``bytes_key`` and ``time_key`` (None: bytes targets only)."""
    t_lo, t_hi = min(past), max(past)
    t_mid = 10 if 10 in past else sorted(past)[len(past) // 2]
    out: dict[str, Any] = {"T_low": t_lo, "T_high": t_hi, "T_mid": t_mid, "bytes": bytes_key, "time": time_key}
    if "lora" not in rows or f"reference T={t_mid}" not in rows:
        return out  # a partial run (--kinds): the targets need plain LoRA and the reference
    lora, ref_mid = rows["lora"], rows[f"reference T={t_mid}"]
    ref_attr = ref_mid[bytes_key] - lora[bytes_key]
    for kind in sorted({r["kind"] for r in rows.values()} - {"frozen", "lora"}):
        lo, hi, mid = (rows[f"{kind} T={t}"] for t in (t_lo, t_hi, t_mid))
        attr = mid[bytes_key] - lora[bytes_key]
        res = {
            "saved_high_over_low": _check(
                hi[bytes_key] / lo[bytes_key], "<= 1.05", hi[bytes_key] <= 1.05 * lo[bytes_key]
            ),
            "adapter_bytes_mid": attr,
            "reference_adapter_bytes_mid": ref_attr,
            "reference_over_adapter_bytes_mid": _check(
                ref_attr / attr if attr > 0 else float("inf"), ">= 10", attr * 10 <= ref_attr
            ),
        }
        if time_key is not None:
            r_lo, r_lora, r_ref = (hi[time_key] / d[time_key] for d in (lo, lora, ref_mid))
            r_ref = mid[time_key] / ref_mid[time_key]
            res["time_high_over_low"] = _check(r_lo, "<= 1.10", r_lo <= 1.10)
            res["time_high_over_lora"] = _check(r_lora, "<= 1.05", r_lora <= 1.05)
            res["time_mid_over_reference"] = _check(r_ref, "<= 1.00", r_ref <= 1.0)
        out[kind] = res
    return out


def _loadavg() -> list[float] | None:
    """1/5/15-minute load average (other work on a shared machine skews wall times)."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch/timm versions, GPU name."""
    import timm

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    info |= {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    info["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _peak(row: dict[str, Any]) -> str:
    key = "cuda_step_peak_bytes_median"
    return f"  step peak {row[key] / MIB:.0f} MiB" if key in row else ""


def print_table(rows: list[dict[str, Any]], lora: dict[str, Any]) -> None:
    """Human-readable table on stdout (wall and CPU medians, ratio to plain LoRA, saved MiB)."""
    head = ("config", "wall s", "IQR", "cpu s", "x lora", "act MiB", "uniq MiB", "param MiB")
    print(f"{head[0]:<16}" + "".join(f"{h:>10}" for h in head[1:]))
    for r in rows:
        vals = (
            r["median_step_s"],
            r["iqr_step_s"],
            r["median_step_cpu_s"],
            r["median_step_s"] / lora["median_step_s"],
        )
        mib = (r["saved_activation_bytes"], r["saved_activation_bytes_unique"], r["saved_param_buffer_bytes"])
        line = f"{r['name']:<16}" + "".join(f"{v:>10.3f}" for v in vals) + "".join(f"{v / MIB:>10.1f}" for v in mib)
        print(line + _peak(r))


def print_targets(tg: dict[str, Any]) -> None:
    """One line per kernel and target."""
    print(f"targets ({tg['time']}, {tg['bytes']}; T {tg['T_low']} -> {tg['T_high']}, mid T={tg['T_mid']}):")
    for kind in [k for k in tg if isinstance(tg[k], dict)]:
        parts = []
        for key, val in tg[kind].items():
            if isinstance(val, dict):
                parts.append(f"{key}={val['value']:.3g} {'PASS' if val['pass'] else 'FAIL'}")
        print(f"  {kind:<10}" + "  ".join(parts))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything to a tiny-model smoke run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter and input dtype")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--past", type=int, nargs="+", default=[0, 1, 5, 10, 20], help="past task counts T")
    p.add_argument("--rank", type=int, default=10, help="rank of every pair (SD-LoRA and plain LoRA)")
    p.add_argument("--classes", type=int, default=10, help="classes per task")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per config before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all configs")
    p.add_argument("--visit-warmup", type=int, default=0, help="untimed steps at each visit of a config")
    p.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="configs to run (default all)")
    p.add_argument("--bytes-only", action="store_true", help="only count saved bytes (deterministic, no timing)")
    p.add_argument("--no-prototype", action="store_true", help="skip the 'folded' prototype kernel")
    p.add_argument("--quick", action="store_true", help="tiny ViT, 32 px, batch 4: smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/adapters*.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.past, args.rounds, args.steps = 4, [0, 2, 5], 2, 1
    if args.out is None:
        suffix = "_quick" if args.quick else ("" if args.device == "cpu" else f"_{args.device}_{args.dtype}")
        args.out = Path(__file__).resolve().parent / "results" / f"adapters{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build every config, measure, print the table and the targets, write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    started = time.perf_counter()
    check = check_reference_matches(args)
    folded_check = check_folded_matches(args)
    cases = build_cases(args, device, dtype)
    size = TINY_KWARGS["img_size"] if args.quick else cases[0].model.backbone.patch_embed.img_size[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    for case in cases:
        case.saved = count_saved(case, x, y, args.classes)
    load_start = _loadavg()
    if not args.bytes_only:
        run_rounds(cases, args, x, y)
    time_key = None if args.bytes_only else "median_step_s"
    rows = [summarize(c) for c in cases]
    by_name = {r["name"]: r for r in rows}
    print_table(rows, by_name.get("lora", rows[0]))
    result = {
        "bench": "adapters",
        "command": "python bench/bench_adapters.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reference_matches_official_max_abs_diff": check,
        "folded_matches_dense_max_abs_diff": folded_check,
        "configs": rows,
        "lora_over_frozen": by_name["lora"]["median_step_s"] / by_name["frozen"]["median_step_s"]
        if {"lora", "frozen"} <= by_name.keys()
        else None,
        "targets": targets(by_name, args.past, "saved_activation_bytes", time_key),
        "targets_cpu_time_unique_bytes": targets(
            by_name, args.past, "saved_activation_bytes_unique", None if args.bytes_only else "median_step_cpu_s"
        ),
        "loadavg_start_end": [load_start, _loadavg()],
        "wall_s": None,
    }
    print(f"lora / frozen step time: {result['lora_over_frozen']}; reference == official preset: {check}")
    print_targets(result["targets"])
    print_targets(result["targets_cpu_time_unique_bytes"])
    result["wall_s"] = time.perf_counter() - started
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
