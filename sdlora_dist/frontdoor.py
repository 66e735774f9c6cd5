"""What ``sdlora train`` does before any rank starts: resolve the config, check inputs, prepare the run dir, launch.

Everything a user can get wrong (benchmark name, shards, config values, run directory, resume target, launch
options) is checked here, in the calling process, so it fails in one line before a process group exists.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.config import Config, apply_overrides, config_from_dict, read_yaml_mapping, save_config
from sdlora_dist.errors import UserError
from sdlora_dist.launch import LaunchSpec, build_command, format_command, launch, resolve_launcher

_HERE = Path(__file__).resolve().parent
# a wheel installs configs/ as sdlora_dist/configs; a source checkout has it beside the package
CONFIG_ROOT = next((p for p in (_HERE / "configs", _HERE.parent / "configs") if (p / "benchmarks").is_dir()), _HERE)


def benchmark_recipes() -> dict[str, Path]:
    """Benchmark name -> recipe YAML shipped in ``configs/benchmarks``."""
    return {p.stem: p for p in sorted((CONFIG_ROOT / "benchmarks").glob("*.yaml"))}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(
    benchmark: str | None, config: str | None, sets: list[str], data: str | None, run_dir: str | None
) -> Config:
    """Recipe of ``benchmark`` <- ``--config`` file <- ``--set`` overrides <- ``--data``/``--run-dir``."""
    raw: dict[str, Any] = {}
    if benchmark is not None:
        recipes = benchmark_recipes()
        if benchmark not in recipes:
            raise UserError(f"unknown benchmark {benchmark!r}: valid are {', '.join(recipes)}")
        raw = read_yaml_mapping(recipes[benchmark])
    if config is not None:
        raw = _merge(raw, read_yaml_mapping(Path(config)))
    if benchmark is None and config is None:
        raise UserError("pass --benchmark NAME (a shipped recipe) or --config FILE")
    apply_overrides(raw, sets)
    if data is not None:
        raw.setdefault("data", {})["shards"] = data
    bench = raw.get("data", {}).get("benchmark", "run")
    raw["run_dir"] = run_dir or raw.get("run_dir") or f"runs/{bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config_from_dict(raw)


def resumed_config(run_dir: str, sets: list[str], what: str) -> Config:
    """The config of an existing run; ``--set`` overrides must not change it (hash compared)."""
    original = ckpt.load_run_config(run_dir)
    if not sets:
        return original
    raw = apply_overrides(original.to_dict(), sets)
    requested = config_from_dict(raw)
    if requested.hash() != original.hash():
        before, after = original.to_dict(), requested.to_dict()
        changed = [
            f"{s}.{k}" for s in before if isinstance(before[s], dict) for k in before[s] if before[s][k] != after[s][k]
        ]
        raise UserError(
            f"{what} {run_dir}: the run was started with a different config (changed: {', '.join(changed)}); "
            "resume with the same config or start a new run with --run-dir"
        )
    return original


def prepare_run_dir(cfg: Config, mode: str) -> None:
    """Fresh runs need an empty run dir; the resolved config is written atomically before launch."""
    run_dir = ckpt.check_writable(cfg.run_dir)
    if mode == "fresh":
        if (run_dir / ckpt.CONFIG_FILE).exists():
            raise UserError(
                f"run directory {run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                "or another --run-dir"
            )
        save_config(cfg, run_dir / ckpt.CONFIG_FILE)


def start_training(cfg: Config, mode: str, spec: LaunchSpec, *, dry_run: bool = False) -> int:
    """Check inputs, then run the worker on every rank through the launcher (in-process for one local rank)."""
    from sdlora_dist.recipe import check_run_split, run_shards

    launcher = resolve_launcher(spec)
    world = spec.nodes * spec.procs_per_node
    if launcher != "env" and cfg.data.batch_size % world:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over the {world} "
            f"ranks (--nodes {spec.nodes} x --gpus-per-node {spec.procs_per_node}); pass --set data.batch_size=N"
        )
    _, split = run_shards(cfg)  # the shards, their class order and task split as this run resolves them
    check_run_split(cfg, mode, split)  # --resume/--continue: refused before anything is written
    worker = [sys.executable, "-m", "sdlora_dist.worker", "--run-dir", str(cfg.run_dir), "--mode", mode]
    if dry_run:
        argv, env = build_command(spec, worker)
        print(format_command(argv, env))
        return 0
    prepare_run_dir(cfg, mode)
    if launcher == "local" and spec.procs_per_node == 1:
        from sdlora_dist.worker import main as worker_main

        return worker_main(worker[3:])
    return launch(spec, worker)


def load_or_resolve(
    *, benchmark, config, sets, data, run_dir, resume: str | None, continue_run: str | None
) -> tuple[Config, str]:
    """The config and mode for ``sdlora train`` from its options."""
    if resume and continue_run:
        raise UserError("pass either --resume RUN_DIR or --continue RUN_DIR, not both")
    target = resume or continue_run
    if target is None:
        return resolve_config(benchmark, config, sets, data, run_dir), "fresh"
    mode, flag = ("resume", "--resume") if resume else ("continue", "--continue")
    if config is not None:
        raise UserError(f"{flag} uses the run's saved config; drop --config")
    cfg = resumed_config(target, sets, flag)
    if benchmark is not None and benchmark != cfg.data.benchmark:
        raise UserError(f"{flag} {target}: the run is for benchmark {cfg.data.benchmark!r}, not {benchmark!r}")
    if data is not None and Path(data).resolve() != Path(cfg.data.shards).resolve():
        raise UserError(f"{flag} {target}: the run reads shards {cfg.data.shards}, not {data}")
    return cfg, mode


__all__ = ["resolve_config", "start_training", "load_or_resolve", "benchmark_recipes"]
