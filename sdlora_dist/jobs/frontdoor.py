"""What ``sdlora train`` does before any rank starts: resolve the config, check inputs, prepare the run dir, launch.

Everything a user can get wrong (benchmark name, shards, config values, run directory, resume target, launch
options) is checked here, in the calling process, so it fails in one line before a process group exists.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdlora_dist import checkpoint as ckpt
from sdlora_dist.config import Config, apply_overrides, config_from_dict, config_root, read_yaml_mapping, save_config
from sdlora_dist.errors import UserError
from sdlora_dist.jobs import ranklog
from sdlora_dist.jobs.launch import LaunchSpec, build_command, format_command, launch, resolve_launcher
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.jobs.runlock import hold_run_lock
from sdlora_dist.model import fill_preprocessing_from_weights
from sdlora_dist.preprocess import preprocessing_origin
from sdlora_dist.weights import fill_architecture_from_weights


def benchmark_recipes() -> dict[str, Path]:
    """Benchmark name -> recipe YAML shipped in ``configs/benchmarks``."""
    return {p.stem: p for p in sorted((config_root() / "benchmarks").glob("*.yaml"))}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


GENERIC_RECIPE = "generic"  # configs/benchmarks/generic.yaml: for shard sets with no recipe of their own


def _recipe_for(benchmark: str | None, shards_benchmark: Callable[[], str] | None) -> dict[str, Any]:
    """The shipped recipe named by ``-b``, else the one of the shards' benchmark, else the generic one."""
    recipes = benchmark_recipes()
    if benchmark is not None:
        if benchmark not in recipes:
            raise UserError(f"unknown benchmark {benchmark!r}: valid are {', '.join(recipes)}")
        return read_yaml_mapping(recipes[benchmark])
    if shards_benchmark is None:
        raise UserError("pass --data SHARDS_DIR (its manifest names the benchmark), --benchmark NAME or --config FILE")
    shipped = shards_benchmark()
    return read_yaml_mapping(recipes[shipped if shipped in recipes else GENERIC_RECIPE])


def _manifest_benchmark(shards: str) -> Callable[[], str]:
    """The benchmark named by the manifest of ``shards``, read at most once (a remote manifest is a request)."""
    from sdlora_dist.data.manifest import load_manifest

    return functools.cache(lambda: load_manifest(shards).benchmark)


def resolve_config(
    benchmark: str | None, config: str | None, sets: list[str], data: str | None, run_dir: str | None
) -> Config:
    """Recipe <- ``--config`` file <- ``--set`` overrides <- ``--data``/``--run-dir``; paths made absolute.

    The recipe is ``-b NAME``; without ``-b`` and ``--config``, the shards' own benchmark recipe, or the generic
    one. A recipe without ``data.benchmark`` (generic) takes the benchmark from the shards' manifest. Unset
    ``model.mean/std/interpolation/crop_pct`` are filled from the weights file when it carries them.
    """
    shards_benchmark = _manifest_benchmark(data) if data is not None else None
    raw = _recipe_for(benchmark, shards_benchmark) if benchmark is not None or config is None else {}
    mine = read_yaml_mapping(Path(config)) if config is not None else {}
    raw = _merge(raw, copy.deepcopy(mine))  # the overrides below must not reach mine (see _user_model)
    apply_overrides(raw, sets)
    if data is not None:
        raw.setdefault("data", {})["shards"] = data
    shards = raw.get("data", {}).get("shards")
    if shards:
        from sdlora_dist.data import urls
        from sdlora_dist.data.manifest import MANIFEST_NAME

        if shards != data:  # from a --config file or --set: not read yet
            shards_benchmark = _manifest_benchmark(shards)
        if urls.is_local(shards):  # resume from another working directory must find the same shards
            shards = raw["data"]["shards"] = str(urls.local_path(shards).absolute())
        readable = not urls.is_local(shards) or Path(shards, MANIFEST_NAME).is_file()  # else: refused later
        if "benchmark" not in raw["data"] and readable:
            raw["data"]["benchmark"] = shards_benchmark()
    bench = raw.get("data", {}).get("benchmark", "run")
    root = os.environ.get("SDLORA_RUNS_ROOT") or "runs"  # per-machine default (README: environment variables)
    chosen = run_dir or raw.get("run_dir") or f"{root}/{bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw["run_dir"] = str(Path(chosen).absolute())
    cfg = config_from_dict(raw)
    return _fill_from_weights(cfg, _user_model(mine, sets))


def _user_model(mine: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The ``model`` keys the user gave (``--config`` file ``mine``, ``--set``), not those of a shipped recipe."""
    model = apply_overrides(mine, sets).get("model")
    return model if isinstance(model, dict) else {}


def _fill_from_weights(cfg: Config, user_model: dict[str, Any]) -> Config:
    """Architecture, then preprocessing, from the weights file where the user did not set them; both printed."""
    given = user_model.get("kwargs")  # only the user's keys: a recipe's kwargs describe the paper's backbone
    user_kwargs = given if isinstance(given, dict) else None
    model, arch_line = fill_architecture_from_weights(
        cfg.model, user_name=cfg.model.name if "name" in user_model else None, user_kwargs=user_kwargs
    )
    if arch_line:
        print(arch_line, file=sys.stderr)
    if model.resize_embeddings:
        print("model.resize_embeddings=true: weights of another patch or image size are resampled", file=sys.stderr)
    filled, source = fill_preprocessing_from_weights(model)
    if model.weights not in (None, "hub", "random"):  # a file: say which of its values are in force
        print(preprocessing_origin(model, filled, source, cfg.data.normalize), file=sys.stderr)
    return config_from_dict({**cfg.to_dict(), "model": filled.model_dump()})  # validated like the rest


def resumed_config(run_dir: str, sets: list[str], what: str) -> Config:
    """The config of an existing run; ``--set`` overrides must not change it (hash compared)."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{what} {run_dir}: the folder does not exist; pass the run directory 'sdlora train' wrote")
    original = ckpt.load_run_config(run_dir)  # run_dir: where it is now, not where config.yaml says it was
    if not sets:
        return original
    raw = apply_overrides(original.to_dict(), sets)
    requested = config_from_dict(raw)
    if requested.hash() != original.hash():
        changed = _changed_keys(original.to_dict(), requested.to_dict())
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


def _ranks_started(run_dir: Path) -> bool:
    """Whether the job got past the point a rank can fail on a wrong setting, so the run is worth resuming.

    A rank that was stopped (Ctrl-C, SIGTERM), killed, crashed or hit a full disk leaves a run ``--resume`` restarts;
    so does any failure after the run header (run.json) was written, e.g. a shard server that went away in task 0.
    Only a user error every rank met during setup (bad weights, shards of another benchmark) leaves nothing.
    """
    if (run_dir / ckpt.RUN_FILE).exists():
        return True
    return any(r.status != "failed" or r.kind != "user" for r in ranklog.read_records(run_dir))


def _release_failed_start(run_dir: Path, before: set[str] | None) -> None:
    """A fresh start that failed before any rank ran leaves the run dir as it found it.

    Otherwise its config.yaml would block the same --run-dir and make --resume refuse the corrected setting. A start
    whose ranks ran keeps everything (logs included): the line printed names ``--resume RUN_DIR`` and its log.
    """
    from sdlora_dist.recipe import ENGINE_DIR

    if ckpt.completed_tasks(run_dir) or (run_dir / ENGINE_DIR).exists() or _ranks_started(run_dir):
        return  # --resume restarts it (from the task's start when there is no engine checkpoint)
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir():
        if path.name in before:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def start_training(cfg: Config, mode: str, spec: LaunchSpec, *, dry_run: bool = False) -> int:
    """Check inputs, then run the worker on every rank through the launcher (in-process for one local rank)."""
    from sdlora_dist.recipe import check_run_split, run_shards, warn_small_tasks

    launcher = resolve_launcher(spec)
    world = spec.nodes * spec.procs_per_node
    if launcher != "env" and cfg.data.batch_size % world:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over the {world} "
            f"ranks (--nodes {spec.nodes} x --gpus-per-node {spec.procs_per_node}); pass --set data.batch_size=N"
        )
    view, split = run_shards(cfg)  # the shards, their class order and task split as this run resolves them
    check_run_split(cfg, mode, split)  # --resume/--continue: refused before anything is written
    warn_small_tasks(cfg, view)
    worker = [sys.executable, "-m", "sdlora_dist.jobs.worker", "--run-dir", str(cfg.run_dir), "--mode", mode]
    if dry_run:
        argv, env = build_command(spec, worker)
        print(format_command(argv, env))
        return 0
    # Taken before the lock (whose file is created inside it), so a failed start can undo its claim exactly.
    before = {p.name for p in Path(cfg.run_dir).iterdir()} if Path(cfg.run_dir).is_dir() else None
    # One job per run directory: node 0's front door holds the lock (other nodes share its directory).
    owner = (spec.node_rank or 0) == 0 and is_rank_zero()
    code, locked = 1, False
    try:
        with hold_run_lock(ckpt.check_writable(cfg.run_dir)) if owner else contextlib.nullcontext():
            locked = True
            prepare_run_dir(cfg, mode)
            if launcher == "local" and spec.procs_per_node == 1:
                from sdlora_dist.jobs.worker import main as worker_main

                code = worker_main(worker[3:])
            else:
                code = launch(spec, worker, run_dir=cfg.run_dir)
    finally:
        # only a start that held the lock undoes its claim: another job's files are never touched
        if locked and owner and code != 0 and mode == "fresh":
            _release_failed_start(Path(cfg.run_dir), before)
    return code


def _changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``section.key`` of every value that differs between two config dicts."""
    sections = [s for s in before if isinstance(before[s], dict)]
    return [f"{s}.{k}" for s in sections for k in before[s] if before[s][k] != after[s][k]]


def _resume_or_start(
    benchmark: str | None, config: str | None, sets: list[str], data: str | None, run_dir: str | None
) -> tuple[Config, str]:
    """``--resume-or-start --run-dir D``: the same command line for a first start and every requeue after it.

    D without a run starts fresh; D with one resumes it when the command resolves to the config it was started
    with (else refused, naming the keys that differ).
    """
    if run_dir is None:
        raise UserError("--resume-or-start needs --run-dir DIR: the run a requeued job finds again")
    requested = resolve_config(benchmark, config, sets, data, run_dir)
    if not (Path(run_dir) / ckpt.CONFIG_FILE).is_file():
        return requested, "fresh"
    original = ckpt.load_run_config(run_dir)
    if requested.hash() != original.hash():
        changed = _changed_keys(original.to_dict(), requested.to_dict())
        raise UserError(
            f"--resume-or-start: {run_dir} holds a run started with a different config (changed: "
            f"{', '.join(changed)}); pass the command line that started it, or another --run-dir"
        )
    return original, "resume"


def load_or_resolve(
    *, benchmark, config, sets, data, run_dir, resume: str | None, continue_run: str | None,
    resume_or_start: bool = False,
) -> tuple[Config, str]:  # fmt: skip
    """The config and mode for ``sdlora train`` from its options."""
    if sum(map(bool, (resume, continue_run, resume_or_start))) > 1:
        raise UserError("pass one of --resume RUN_DIR, --continue RUN_DIR and --resume-or-start, not several")
    if resume_or_start:
        return _resume_or_start(benchmark, config, sets, data, run_dir)
    target = resume or continue_run
    if target is None:
        return resolve_config(benchmark, config, sets, data, run_dir), "fresh"
    mode, flag = ("resume", "--resume") if resume else ("continue", "--continue")
    if config is not None:
        raise UserError(f"{flag} uses the run's saved config; drop --config")
    cfg = resumed_config(target, sets, flag)
    if benchmark is not None and benchmark != cfg.data.benchmark:
        raise UserError(f"{flag} {target}: the run is for benchmark {cfg.data.benchmark!r}, not {benchmark!r}")
    from sdlora_dist.data import urls

    if data is not None and not urls.same_location(data, cfg.data.shards):
        raise UserError(f"{flag} {target}: the run reads shards {cfg.data.shards}, not {data}")
    return cfg, mode


__all__ = ["resolve_config", "start_training", "load_or_resolve", "benchmark_recipes"]
