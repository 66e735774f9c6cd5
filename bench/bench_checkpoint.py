"""Task-checkpoint bytes and save/load seconds against the task count (issue 14, item 6, "Measure it").

Side by side in one process: the current layout (``checkpoint.save_task_checkpoint``: each task folder holds what
its task changed) and the layout before it (every folder a full copy of every adapter tensor, ``progress.json``
repeating every earlier record, progress and metrics written twice), reproduced by :func:`save_old_layout` below
from the code it replaced. A model goes through T tasks (consolidate, open the next task, random values in the
trainable tensors: no training, it is about bytes), saving after each task as the recipe does; at each T in
``--tasks`` the bench records the bytes under ``tasks/``, the cumulative save seconds, the seconds to read the
newest task's tensors (``assemble_task_state``, the same call for both layouts: old runs load through it) and of the
whole ``load_task_model`` (which also builds a randomly initialised backbone before loading W0 into it).

    python bench/bench_checkpoint.py                         # tiny ViT (vit_tiny shape) and ViT-B/16 shape
    python bench/bench_checkpoint.py --models tiny --tasks 10 50

``--engine`` measures instead the mid-task engine checkpoint (issue 18): ``distributed.save_engine_checkpoint`` of
a one-rank DeepSpeed engine over the ImageNet-R recipe's trainable state at ViT-B/16 shapes (this task's q/v
factors, the magnitudes, the head, SGD momentum; frozen weights excluded) at tasks 0 and 9 of 10, its bytes, and the
per-step decision the recipe makes (one 2-float all-reduce), then the overhead of ``train.checkpoint_every_s``.

    python bench/bench_checkpoint.py --engine                # -> bench/results/engine_checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdlora_dist import checkpoint as ckpt  # import sdlora_dist before timm: torchvision compat
from sdlora_dist.config import load_config
from sdlora_dist.fileio import atomic_dir, atomic_write_json, atomic_write_text
from sdlora_dist.metrics import AccuracyLog, matrix_csv
from sdlora_dist.model import SDLoRAViT, build_model

MODELS = {  # timm name and kwargs: only the adapter and head shapes matter here, so images stay 32 px
    "tiny": ("vit_tiny_patch16_224", "{img_size: 32, patch_size: 16}"),
    "vit_b16": ("vit_base_patch16_224", "{img_size: 32, patch_size: 16}"),
}
CLASSES_PER_TASK = 2


def save_old_layout(run_dir: Path, task: int, model: SDLoRAViT, history: dict[str, Any], log: AccuracyLog) -> None:
    """The writer this issue replaced: a full copy per folder, full history, progress and metrics twice."""
    rest = ckpt.adapter_state(model)
    layout = model.layout()

    def fill(tmp: Path) -> None:
        save_file(rest, str(tmp / ckpt.ADAPTERS_FILE))
        (tmp / ckpt.LAYOUT_FILE).write_text(json.dumps(layout, indent=2))
        (tmp / ckpt.PROGRESS_FILE).write_text(json.dumps(history, indent=2))

    # named like today's folders (the old ``task_003`` names are no longer looked up); the bytes do not depend on it
    folder = run_dir / ckpt.TASKS_DIR / ckpt.task_dir_name(task)
    atomic_dir(folder, fill)
    for _ in range(2):  # after the checkpoint and again once its time was known (recipe.py before this issue)
        atomic_write_json(run_dir / ckpt.METRICS_FILE, history)
        atomic_write_text(run_dir / ckpt.METRICS_CSV, matrix_csv(log))
    atomic_write_json(folder / ckpt.PROGRESS_FILE, history)


def save_new_layout(run_dir: Path, task: int, model: SDLoRAViT, history: dict[str, Any], log: AccuracyLog) -> None:
    """The current writer, called as ``recipe.run_task`` calls it."""
    record = history["tasks"][-1]
    own = {"record": record, "correct": history["accuracy"]["correct"][-1], "totals": history["accuracy"]["totals"]}
    ckpt.save_task_checkpoint(
        run_dir, task, model, own, times=record["time_s"], metrics=history, metrics_csv=matrix_csv(log)
    )


def next_task(model: SDLoRAViT, task: int, gen: torch.Generator, history: dict[str, Any], log: AccuracyLog) -> None:
    """Close the open task, open ``task``, fill its trainable tensors, append a recipe-like record."""
    if model.current_key is not None:
        model.consolidate()
    model.add_task(CLASSES_PER_TASK)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (0.8 if p.numel() == 1 else 0.0))
    log.add_row([1] * (task + 1), [10] * (task + 1))
    history["accuracy"] = {"correct": log.correct, "totals": log.totals}
    mags = {k: p.detach().float().tolist() for k, p in model.magnitudes.values.items()}
    history["tasks"].append({"task": task, "magnitudes": mags, "time_s": {"train": 1.0}})


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(model_key: str, layout: str, marks: list[int], root: Path) -> list[dict[str, Any]]:
    """One run of ``max(marks)`` tasks in ``layout``; a row at each mark."""
    name, kwargs = MODELS[model_key]
    cfg = load_config(overrides=["model.weights=random", f"model.name={name}", f"model.kwargs={kwargs}"])
    model = build_model(cfg)
    run_dir = root / f"{model_key}_{layout}"
    ckpt.write_run_header(run_dir, cfg, model, {"benchmark": "bench"})
    save = save_new_layout if layout == "new" else save_old_layout
    gen = torch.Generator().manual_seed(0)
    history: dict[str, Any] = {"accuracy": {}, "tasks": []}
    log = AccuracyLog()
    rows, save_s = [], 0.0
    for task in range(max(marks)):
        next_task(model, task, gen, history, log)
        start = time.perf_counter()
        save(run_dir, task, model, history, log)
        save_s += time.perf_counter() - start
        if task + 1 not in marks:
            continue
        folder = ckpt.task_folder(run_dir / ckpt.TASKS_DIR, task)
        start = time.perf_counter()
        ckpt.assemble_task_state(run_dir, folder, ckpt.read_json(folder / ckpt.LAYOUT_FILE))
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = ckpt.load_task_model(run_dir, task, cfg)
        load_s = time.perf_counter() - start
        want, got = model.state_dict(), loaded.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), f"{layout} layout did not load back exactly"
        folders = sorted((run_dir / ckpt.TASKS_DIR).iterdir())
        rows.append({
            "model": model_key, "layout": layout, "T": task + 1,
            "checkpoint_bytes": dir_bytes(run_dir / ckpt.TASKS_DIR),
            "first_folder_bytes": dir_bytes(folders[0]), "last_folder_bytes": dir_bytes(folders[-1]),
            "metrics_bytes": (run_dir / ckpt.METRICS_FILE).stat().st_size,
            "save_s_total": round(save_s, 3), "read_s_last": round(read_s, 4), "load_s_last": round(load_s, 3),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    shutil.rmtree(run_dir)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """old / new for every (model, T) measured in both layouts."""
    new = {(r["model"], r["T"]): r for r in rows if r["layout"] == "new"}
    out = []
    for r in rows:
        n = new.get((r["model"], r["T"]))
        if r["layout"] == "old" and n:
            out.append({
                "model": r["model"], "T": r["T"],
                "bytes_old_over_new": round(r["checkpoint_bytes"] / n["checkpoint_bytes"], 2),
                "save_s_old_over_new": round(r["save_s_total"] / n["save_s_total"], 2),
                "read_s_old_over_new": round(r["read_s_last"] / n["read_s_last"], 2),
                "load_s_old_over_new": round(r["load_s_last"] / n["load_s_last"], 2),
            })  # fmt: skip
    return out


ENGINE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "benchmarks" / "imagenet-r.yaml"


def measure_engine(root: Path, task: int, repeats: int = 5) -> dict[str, Any]:
    """Seconds and bytes of one engine checkpoint with task ``task`` open (ImageNet-R recipe, ViT-B/16 shapes)."""
    from sdlora_dist.jobs import distributed as dist
    from sdlora_dist.recipe import make_optimizer

    cfg = load_config(ENGINE_RECIPE, ["model.weights=random", "model.kwargs={img_size: 32}", "train.precision=fp32"])
    model = build_model(cfg)
    per_task = 200 // cfg.data.tasks  # ImageNet-R: 200 classes
    for _ in range(task + 1):
        if model.current_key is not None:
            model.consolidate()
        model.add_task(per_task)
    params = model.trainable_parameters()
    optimizer = make_optimizer(cfg, params)
    ds = dist.deepspeed_config(cfg.train, micro_batch_per_rank=cfg.data.batch_size, world_size=1, precision="fp32")
    engine = dist.build_engine(model, params, optimizer, None, ds)
    loss = engine(torch.randn(2, 3, 32, 32)).float().pow(2).mean()  # one step: SGD momentum buffers exist
    engine.backward(loss)
    engine.step()
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        tag = dist.save_engine_checkpoint(engine, root / f"engine_{task}", f"step_{i:08d}", {"epoch": 0, "step": i})
        seconds.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in params)
    dist.release_engine(engine)
    row = {
        "task": task, "trainable_params": trainable, "checkpoint_bytes": dir_bytes(tag),
        "save_s_median": round(sorted(seconds)[len(seconds) // 2], 4), "save_s_max": round(max(seconds), 4),
    }  # fmt: skip
    print(json.dumps(row), file=sys.stderr)
    return row


def _decide_rank(rank: int, port: int, steps: int, out: Any) -> None:
    """One of two gloo ranks timing the recipe's per-step decision: a 2-float all-reduce read back."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flags = torch.zeros(2)
    tdist.all_reduce(flags)  # connect first
    start = time.perf_counter()
    for _ in range(steps):
        tdist.all_reduce(flags)
        flags.tolist()
    if rank == 0:
        out.put((time.perf_counter() - start) / steps)
    tdist.destroy_process_group()


def decide_seconds(steps: int = 2000) -> float:
    """Seconds per step of the stop/checkpoint decision on 2 gloo ranks on this machine."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_decide_rank, args=(r, port, steps, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    seconds = out.get(timeout=300)
    for proc in procs:
        proc.join()
    return seconds


def engine_main(out: Path) -> None:
    """``--engine``: the engine checkpoint rows and the default interval's overhead."""
    from sdlora_dist.config import TrainConfig

    every_s = TrainConfig().checkpoint_every_s
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        rows = [measure_engine(Path(tmp), task) for task in (0, 9)]
    worst = max(r["save_s_max"] for r in rows)
    result = {
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, 2 threads",
        "recipe": "configs/benchmarks/imagenet-r.yaml (ViT-B/16 shapes, rank 10 on q/v of 12 blocks, SGD momentum)",
        "rows": rows,
        "decide_s_per_step_2_gloo_ranks": round(decide_seconds(), 7),
        "checkpoint_every_s": every_s,
        # one checkpoint per interval at most, counted from the task's start: shorter tasks never pay it
        "overhead_of_default_pct": round(100 * worst / every_s, 4),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[10, 50, 100])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--engine", action="store_true", help="Measure the mid-task engine checkpoint instead.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = Path(__file__).parent / "results"
    if args.engine:
        engine_main(args.out or results / "engine_checkpoint.json")
        return
    args.out = args.out or results / "checkpoint.json"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        for model_key in args.models:
            for layout in ("new", "old"):
                rows += measure(model_key, layout, sorted(args.tasks), Path(tmp))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
        f"torch {torch.__version__}, 2 threads",
        "classes_per_task": CLASSES_PER_TASK,
        "rows": rows,
        "ratios": ratios(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
