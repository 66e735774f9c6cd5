"""The task loop, top to bottom. Every rank runs :func:`run_training`; rank 0 decides and writes.

For each task t::

    consolidate task t-1 (rank 0 plans, broadcast, every rank applies)
    -> add_task(t) -> build this task's DeepSpeed engine -> train (mid-task engine checkpoints)
    -> evaluate on every task seen so far (all-reduced counts) -> checksum all-gather (ranks agree)
    -> task checkpoint + metrics (rank 0, atomic)

Consolidation is the transition between tasks (see ``model.py``): the checkpoint of task t holds the model exactly
as trained and evaluated, which is what export merges. Data order and augmentation are functions of
(seed, task, epoch), and the per-epoch learning rate is computed, not stepped, so a killed run resumed from an
engine checkpoint replays the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdlora_dist import checkpoint as ckpt
from sdlora_dist import drift, head_align, ridge_head
from sdlora_dist.class_metrics import class_counts
from sdlora_dist.config import Config, TrainConfig
from sdlora_dist.consolidate import Decision
from sdlora_dist.data import Manifest, TransformSpec, load_manifest, make_eval_loader, make_train_loader, urls
from sdlora_dist.data.classes import one_class_warning, resolve_split, split_changes, task_view
from sdlora_dist.data.planning import train_steps_per_epoch
from sdlora_dist.errors import NonFiniteLoss, UserError
from sdlora_dist.jobs import distributed as dist
from sdlora_dist.jobs import preempt
from sdlora_dist.jobs.rank import is_rank_zero
from sdlora_dist.logs import log_all_ranks, log_rank_zero, log_warning, progress_bar
from sdlora_dist.metrics import format_table, matrix_csv
from sdlora_dist.model import SDLoRAViT, build_model, masked_cross_entropy
from sdlora_dist.preprocess import transform_spec
from sdlora_dist.records import RunProgress, TaskRecord, TrainStats
from sdlora_dist.tracking import TensorBoardTracker, Trackers

ENGINE_DIR = "engine"
MODES = ("fresh", "resume", "continue")


# ---------------------------------------------------------------------------------------------------------------------
# Setup helpers


def check_shards(cfg: Config) -> Manifest:
    """Load the shards' manifest and check it is the benchmark the config is for."""
    if not cfg.data.shards:
        raise UserError("data.shards is not set: pass --data SHARDS_DIR (written by 'sdlora data prepare')")
    manifest = load_manifest(cfg.data.shards)
    if manifest.benchmark != cfg.data.benchmark:
        raise UserError(
            f"shards at {cfg.data.shards} hold benchmark {manifest.benchmark!r} but the config is for "
            f"{cfg.data.benchmark!r}; pass the matching --benchmark or --data"
        )
    return manifest


def run_shards(cfg: Config) -> tuple[Manifest, dict[str, Any]]:
    """The shards as this run sees them (its class order and task split) and the split's record for run.json."""
    manifest = check_shards(cfg)
    split = resolve_split(manifest, cfg.data)
    view = task_view(manifest, split)
    return view, split.record(manifest.stored_names)


def check_run_split(cfg: Config, mode: str, record: dict[str, Any]) -> None:
    """--resume / --continue: the shards must still give the class order and split the run was trained with.

    Compared before anything is written, so a refused run directory stays byte-identical. Runs written before the
    split was recorded are compared by their class names.
    """
    path = Path(cfg.run_dir) / ckpt.RUN_FILE
    if mode == "fresh" or not path.is_file():
        return
    info = ckpt.read_json(path)
    recorded = info.get("task_split")
    if recorded is None:  # a run from before the split was recorded: its class names, in global-label order
        names = list(info.get("class_names", []))
        current = [n for task in record["task_classes"] for n in task]
        changes = [] if current[: len(names)] == names else ["the class order (class names by label) differs"]
        fingerprint = "not recorded"
    else:
        changes, fingerprint = split_changes(recorded, record), recorded["fingerprint"]
    if changes:
        flag = "--resume" if mode == "resume" else "--continue"
        raise UserError(
            f"{flag} {cfg.run_dir}: the shards at {cfg.data.shards} no longer give the class order and task split "
            f"this run was trained with ({'; '.join(changes)}; split fingerprint: run {fingerprint}, shards now "
            f"{record['fingerprint']}); restore the shard set the run used, or start a new run with --run-dir"
        )


def warn_small_tasks(cfg: Config, view: Manifest) -> None:
    """Warn once, at start, about tasks that cannot train as meant: one class, or fewer samples than one batch."""
    per_task = list(view.classes_per_task)
    at_most = max(1, sum(per_task) // 2)
    warning = one_class_warning(
        per_task, f"pass --set data.tasks={at_most} or fewer, or data.classes_per_task with two or more per task"
    )
    if warning:
        log_warning(warning)
    batch = cfg.data.batch_size
    small = {t: n for t in range(len(per_task)) if (n := view.num_samples("train", t)) < batch}
    if small:
        listed = ", ".join(f"task {t}: {n}" for t, n in small.items())
        log_warning(
            f"warning: fewer training samples than one global batch (data.batch_size={batch}) in {listed}: an epoch "
            f"of such a task is one step of repeated images; pass --set data.batch_size={min(small.values())} or less"
        )


def task_lr(cfg: Config, task: int, epoch: int) -> float:
    """MultiStepLR as a pure function of (task, epoch): resumable without scheduler state."""
    base = cfg.train.first_task_lr if task == 0 and cfg.train.first_task_lr is not None else cfg.train.lr
    return base * cfg.train.gamma ** sum(1 for m in cfg.train.milestones if epoch >= m)


def task_epochs(cfg: Config, task: int) -> int:
    """Epochs of ``task`` (task 0 may differ)."""
    return cfg.train.first_task_epochs if task == 0 and cfg.train.first_task_epochs else cfg.train.epochs


# train.optimizer (config.Optimizer) -> the optimizer over (params, train config)
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, t: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
    "adam": lambda params, t: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay),
    "adamw": lambda params, t: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay),
}


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimizer over this task's trainable parameters (learning rate set per epoch)."""
    return OPTIMIZERS[cfg.train.optimizer](params, cfg.train)


def adapter_checksum(model: SDLoRAViT) -> str:
    """sha256 of every non-frozen tensor (factors, magnitudes, head) in name order."""
    rest = ckpt.adapter_state(model)
    h = hashlib.sha256()
    for key in sorted(rest):
        h.update(key.encode())
        h.update(rest[key].float().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------------
# State: fresh start, resume, continue


def restore_state(cfg: Config, mode: str, manifest: Manifest) -> tuple[SDLoRAViT, RunProgress, int]:
    """Model, progress and the first task to train, for a fresh, resumed or continued run."""
    run_dir = Path(cfg.run_dir)
    done = ckpt.completed_tasks(run_dir)
    if mode == "fresh" or not done:
        if mode == "continue":
            raise UserError(f"--continue {run_dir}: the run has no completed task; use --resume or start fresh")
        return build_model(cfg), RunProgress(), 0
    last = done[-1]
    if mode == "continue" and last + 1 >= manifest.num_tasks():
        raise UserError(
            f"--continue {run_dir}: all {manifest.num_tasks()} task(s) of {cfg.data.shards} are trained; "
            "append new classes with 'sdlora data add-task' first"
        )
    model = ckpt.load_task_model(run_dir, last, cfg)
    progress = ckpt.load_progress(run_dir, last)
    log_rank_zero(f"{mode}: tasks 0..{last} are complete in {run_dir}; starting at task {last + 1}")
    return model, progress, last + 1


def last_task(cfg: Config, manifest: Manifest, mode: str) -> int:
    """One past the last task to train (``train.tasks`` caps a fresh/resumed run; --continue trains all new ones)."""
    n = manifest.num_tasks()
    return n if mode == "continue" or cfg.train.tasks is None else min(n, cfg.train.tasks)


def latest_engine_checkpoint(run_dir: Path, task: int) -> str | None:
    """Newest complete mid-task engine checkpoint tag of ``task`` (hidden partial tags are ignored)."""
    folder = ckpt.task_folder(run_dir / ENGINE_DIR, task)
    tags = sorted(p.name for p in folder.glob("step_*") if p.is_dir()) if folder.is_dir() else []
    return tags[-1] if tags else None


# ---------------------------------------------------------------------------------------------------------------------
# The three phases of a task


def consolidate_everywhere(model: SDLoRAViT) -> Decision:
    """Rank 0 plans the consolidation of the open task, broadcasts it, every rank applies it."""
    plan = model.plan_consolidation().to_dict() if is_rank_zero() else None
    decision = Decision.from_dict(dist.broadcast_object(plan, src=0))
    model.apply_consolidation(decision)
    log_all_ranks(f"applied rank 0's consolidation of {decision.task}: {decision.action}, "
                  f"adapter checksum {adapter_checksum(model)[:16]}")  # fmt: skip
    return decision


@dataclass
class TaskContext:
    """What training one task needs: the run's config, model, ranks, preprocessing and shards, and the task."""

    cfg: Config
    model: SDLoRAViT
    env: dist.DistEnv
    spec: TransformSpec
    manifest: Manifest
    task: int
    trackers: Trackers = dataclasses.field(default_factory=lambda: Trackers([]))
    step_offset: int = 0  # optimizer steps of the run's earlier tasks: the tracking step axis continues from here

    @property
    def per_rank(self) -> int:
        """Batch of one rank per optimizer step (the global batch split evenly)."""
        return self.cfg.data.batch_size // self.env.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (every rank runs the same number), capped by ``train.max_steps_per_epoch``."""
        steps = train_steps_per_epoch(self.manifest, self.task, self.cfg.data.batch_size)
        return min(steps, self.cfg.train.max_steps_per_epoch or steps)

    @property
    def engine_dir(self) -> Path:
        """Folder of this task's mid-task engine checkpoints."""
        return ckpt.task_folder(Path(self.cfg.run_dir) / ENGINE_DIR, self.task)


def train_task(ctx: TaskContext) -> TrainStats:
    """Train ``ctx.task`` with a fresh DeepSpeed engine; resumes from the newest mid-task engine checkpoint."""
    cfg, env, model = ctx.cfg, ctx.env, ctx.model
    if cfg.data.batch_size % env.world_size:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {env.world_size} ranks")
    accum = cfg.train.grad_accum
    if ctx.per_rank % accum:
        raise UserError(
            f"train.grad_accum={accum} must divide each rank's batch (data.batch_size={cfg.data.batch_size} over "
            f"{env.world_size} rank(s) = {ctx.per_rank}); pick a divisor of {ctx.per_rank}"
        )
    precision = dist.precision_for(cfg.train.precision, env.device)
    params = model.trainable_parameters()
    optimizer = make_optimizer(cfg, params)
    ds_config = dist.deepspeed_config(
        cfg.train, micro_batch_per_rank=ctx.per_rank // accum, world_size=env.world_size, precision=precision,
        grad_accum=accum, grad_clip=cfg.train.grad_clip,
    )  # fmt: skip
    engine = dist.build_engine(model, params, optimizer, None, ds_config)
    start = {"epoch": 0, "step": 0}
    tag = latest_engine_checkpoint(Path(cfg.run_dir), ctx.task)
    if tag is not None:
        start = dist.load_engine_checkpoint(engine, ctx.engine_dir, tag)  # load_state_dict post-hooks rebuild banks
        log_rank_zero(
            f"task {ctx.task}: resumed from engine checkpoint {tag} (epoch {start['epoch']}, step {start['step']})"
        )
    stats = _run_epochs(ctx, engine, start)
    dist.release_engine(engine)  # the model is float32 again: what follows (eval, consolidation, saving) runs in it
    model.rebuild_derived_state()  # a mid-task engine load rebuilt the past bank from bf16 factors: redo it in fp32
    return dataclasses.replace(stats, precision=precision, device=env.device.type)


def _train_task_preemptible(ctx: TaskContext) -> TrainStats:
    """:func:`train_task` with SIGTERM honoured at a step boundary (an engine checkpoint, then ``Preempted``)."""
    with preempt.deferred():
        return train_task(ctx)


class StepMonitor:
    """Everything around the optimizer step: progress bar (refreshed every 10 steps), the loss and rate sent to the
    trackers every step, mid-task engine checkpoints (every ``train.checkpoint_every`` steps and
    ``train.checkpoint_every_s`` seconds) and preemption (SIGTERM).

    ``on_step`` runs after each ``engine.step()``; the step loop itself stays forward, backward, step.
    """

    def __init__(self, ctx: TaskContext, engine: Any, start: dict[str, int]) -> None:
        self.ctx, self.engine = ctx, engine
        self.steps = ctx.steps_per_epoch
        self.total = task_epochs(ctx.cfg, ctx.task) * self.steps
        self.done = start["epoch"] * self.steps + start["step"]
        self.seen, self.loss, self.lr, self.epoch = 0, float("nan"), 0.0, start["epoch"]
        self.t0 = self.t_last = time.perf_counter()
        self.saved_at = time.monotonic()  # train.checkpoint_every_s counts from the task's (re)start
        self.bar = progress_bar(
            total=self.total, initial=self.done, desc=f"task {ctx.task}", unit="step", disable=not is_rank_zero()
        )

    def __enter__(self) -> StepMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def on_epoch(self, epoch: int, lr: float) -> None:
        """A new epoch starts at learning rate ``lr``."""
        self.epoch, self.lr = epoch, lr

    def check_loss(self, loss: torch.Tensor) -> None:
        """Stop every rank, before the backward pass, when any rank's loss is NaN or infinite: nothing of the bad
        step reaches the weights, and the checkpoints written so far stay the run's last good state."""
        bad = dist.all_reduce_sum((~torch.isfinite(loss.detach())).to(torch.long).reshape(1))
        if not bad.item():
            return
        run_dir = Path(self.ctx.cfg.run_dir)
        tag = latest_engine_checkpoint(run_dir, self.ctx.task)
        done = ckpt.completed_tasks(run_dir)
        last = (self.ctx.engine_dir / tag if tag else ckpt.task_folder(run_dir / ckpt.TASKS_DIR, done[-1]) if done
                else "none (no task finished yet)")  # fmt: skip
        raise NonFiniteLoss(
            f"task {self.ctx.task}: the training loss is not finite on {int(bad.item())} rank(s) (rank "
            f"{self.ctx.env.rank}: {loss.item()}) at step {self.done + 1} of {self.total} "
            f"(epoch {self.epoch}, lr {self.lr:.3g}); stopped before that step changed any weight. Last good "
            f"checkpoint: {last}. Lower train.lr or set train.grad_clip in {run_dir / ckpt.CONFIG_FILE}, then: "
            f"sdlora train --resume {run_dir}"
        )

    def on_step(self, step: int, loss: torch.Tensor, batch: int) -> None:
        """Step ``step`` of the epoch finished with ``loss`` on a per-rank batch of ``batch`` samples."""
        self.seen += batch * self.ctx.env.world_size
        self.done += 1
        self.bar.update(1)
        self.loss = loss.item()  # the finite check already waited for the device this step
        now = time.perf_counter()
        rate = batch * self.ctx.env.world_size / max(now - self.t_last, 1e-9)
        self.t_last = now
        self.ctx.trackers.log({"train/loss": self.loss, "train/lr": self.lr, "train/images_per_s": rate},
                              self.ctx.step_offset + self.done)  # fmt: skip
        if self.done % 10 == 0 or self.done == self.total:
            rate = self.seen / (now - self.t0)
            self.bar.set_postfix(loss=f"{self.loss:.3f}", lr=f"{self.lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
        stop, due = self._decide()
        if stop or (due and self.done < self.total):
            nxt = (
                {"epoch": self.epoch, "step": step + 1}
                if step + 1 < self.steps
                else {"epoch": self.epoch + 1, "step": 0}
            )
            tag = f"step_{self.done:08d}"
            self.ctx.trackers.flush()  # every step up to the checkpoint is kept; a crash loses only what is replayed
            dist.save_engine_checkpoint(self.engine, self.ctx.engine_dir, tag, client_state=nxt)
            self.saved_at = time.monotonic()
            log_all_ranks(f"task {self.ctx.task}: engine checkpoint {tag} written")
            if stop:
                raise preempt.checkpointed(
                    f"preempted (SIGTERM) after step {self.done} of {self.total} of task {self.ctx.task}: engine "
                    f"checkpoint {tag} written"
                )

    def _decide(self) -> tuple[bool, bool]:
        """(stop now, checkpoint now), the same on every rank: any rank's SIGTERM stops all; rank 0's clock decides
        ``train.checkpoint_every_s`` (ranks' clocks differ), the step count ``train.checkpoint_every``."""
        train = self.ctx.cfg.train
        by_time = is_rank_zero() and train.checkpoint_every_s > 0
        by_time = by_time and time.monotonic() - self.saved_at >= train.checkpoint_every_s
        flags = torch.tensor([float(preempt.requested()), float(by_time)], device=self.ctx.env.device)
        stop, timed_out = (v > 0 for v in dist.all_reduce_sum(flags).tolist())  # one tiny all-reduce per step
        by_steps = bool(train.checkpoint_every) and self.done % train.checkpoint_every == 0
        return stop, timed_out or by_steps


def _run_epochs(ctx: TaskContext, engine: Any, start: dict[str, int]) -> TrainStats:
    """The epochs of one task from ``start`` (epoch, step); engine checkpoints every ``train.checkpoint_every``."""
    cfg, env, model, task = ctx.cfg, ctx.env, ctx.model, ctx.task
    offset, n_cls = model.class_offset(task), model.task_classes[task]
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    corrupt = 0
    with StepMonitor(ctx, engine, start) as monitor:
        for epoch in range(start["epoch"], task_epochs(cfg, task)):
            lr = task_lr(cfg, task, epoch)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            monitor.on_epoch(epoch, lr)
            loader = make_train_loader(
                cfg.data, task, spec=ctx.spec, epoch=epoch, seed=cfg.train.seed, rank=env.rank,
                world_size=env.world_size, steps_per_epoch=monitor.steps, manifest=ctx.manifest,
            )  # fmt: skip
            skip = start["step"] if epoch == start["epoch"] else 0
            for step, (x, y) in enumerate(loader):
                if step < skip:
                    continue
                loss = optimizer_step(engine, monitor, x.to(env.device, dtype), y.to(env.device), offset, n_cls)
                monitor.on_step(step, loss, x.shape[0])
            corrupt += loader.stats.corrupt
    return TrainStats(steps=monitor.total, final_loss=monitor.loss, images=monitor.seen, corrupt_skipped=corrupt)


def optimizer_step(engine: Any, monitor: StepMonitor, x: torch.Tensor, y: torch.Tensor, offset: int,
                   n_cls: int) -> torch.Tensor:  # fmt: skip
    """One optimizer step over this rank's batch, as ``train.grad_accum`` equal micro-batches: forward, finite
    check and backward for each (DeepSpeed divides each loss by the count and steps the optimizer at the last).
    Returns the batch's mean loss, so the curve does not depend on the accumulation."""
    losses = []
    for xs, ys in zip(x.chunk(engine.gradient_accumulation_steps()), y.chunk(engine.gradient_accumulation_steps()),
                      strict=True):  # fmt: skip
        loss = masked_cross_entropy(engine(xs).float(), ys, offset, n_cls)
        monitor.check_loss(loss)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(cfg: Config, model: SDLoRAViT, task: int, env: dist.DistEnv, spec: TransformSpec,
             manifest: Manifest | None = None, confusion: torch.Tensor | None = None
             ) -> tuple[list, list]:  # fmt: skip
    """Correct counts and sizes per task group 0..task over all ranks (each test sample read exactly once);
    ``confusion`` ([seen classes, seen classes], int64), when given, is filled with (true, predicted) counts."""
    model.eval()
    offsets = torch.tensor([model.class_offset(j + 1) for j in range(task + 1)])
    counts = torch.zeros(2, task + 1, dtype=torch.long)
    dtype = next(model.parameters()).dtype
    loader = make_eval_loader(
        cfg.data.shards, list(range(task + 1)), spec=spec, batch_size=cfg.data.eval_batch_size, rank=env.rank,
        world_size=env.world_size, num_workers=cfg.data.num_workers, corrupt=cfg.data.corrupt,
        bad_shard=cfg.data.bad_shard, cache_dir=cfg.data.cache_dir, manifest=manifest,
    )  # fmt: skip
    for x, y in progress_bar(loader, desc=f"eval {task}", unit="batch", disable=not is_rank_zero()):
        pred = model(x.to(env.device, dtype)).argmax(dim=1).cpu()
        group = torch.bucketize(y, offsets, right=True)
        counts[0].index_add_(0, group, (pred == y).long())
        counts[1].index_add_(0, group, torch.ones_like(y))
        if confusion is not None:
            confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    model.train()
    counts = dist.all_reduce_sum(counts.to(env.device)).cpu()
    if confusion is not None:
        confusion.copy_(dist.all_reduce_sum(confusion.to(env.device)).cpu())
    return counts[0].tolist(), counts[1].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# The run


def run_training(cfg: Config, mode: str = "fresh") -> RunProgress:
    """Train every remaining task of the shard set on this rank (all ranks call this)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if cfg.train.deterministic:
        set_deterministic()
    env = dist.init_distributed(cfg.train.timeout_s)
    torch.manual_seed(cfg.train.seed)
    manifest, split = run_shards(cfg)
    check_run_split(cfg, mode, split)  # before anything is written (also checked by the front door)
    run_dir = Path(cfg.run_dir)
    model, progress, first = restore_state(cfg, mode, manifest)
    model.to(env.device)
    if is_rank_zero():
        info = {"benchmark": manifest.benchmark, "shards": urls.display(cfg.data.shards)}
        info["data_fingerprint"] = manifest.fingerprint  # exported models carry it (export/lineage.py)
        info |= {"class_names": manifest.class_names, "task_split": split}
        ckpt.write_run_header(run_dir, cfg, model, info)
    spec = transform_spec(model, cfg.data)
    trackers = open_trackers(cfg, progress, first)
    try:
        for task in range(first, last_task(cfg, manifest, mode)):
            record = run_task(cfg, model, task, manifest, env, spec, progress, trackers=trackers)
            log_rank_zero(
                f"task {task}: top1 {progress.log.top1_curve()[-1]:.2f} | "
                + " ".join(f"{k} {v:.1f}s" for k, v in record.time_s.items())
            )
        if is_rank_zero() and progress.log.num_tasks:
            log_rank_zero(format_table(progress.log))
            trackers.artifacts(run_artifacts(run_dir, trackers))
    except BaseException:
        trackers.close(failed=True)  # the tracked run shows as failed; what it logged stays
        raise
    trackers.close()
    dist.barrier()
    return progress


def set_deterministic() -> None:
    """``train.deterministic``: torch's deterministic algorithms and no cuDNN autotuning (bitwise-repeatable GPU
    runs; an op without a deterministic kernel raises instead of running)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first handle
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def open_trackers(cfg: Config, progress: RunProgress, first: int) -> Trackers:
    """The run's trackers on rank 0 (none elsewhere), continuing after the steps already done: those of the finished
    tasks plus those of task ``first`` up to its newest mid-task engine checkpoint (where training resumes)."""
    from sdlora_dist import tracking

    names = tracking.resolve(cfg.train.report_to)  # every rank: a missing package stops all of them at once
    if not is_rank_zero():
        return Trackers([])
    log_rank_zero(f"tracking: {', '.join(names)} (train.report_to)")
    tag = latest_engine_checkpoint(Path(cfg.run_dir), first)
    start = progress.steps + (int(tag.removeprefix("step_")) if tag else 0)
    return Trackers.open(names, Path(cfg.run_dir), start, cfg.to_dict())


def run_artifacts(run_dir: Path, trackers: Trackers) -> list[Path]:
    """Config, lineage (run.json, metrics.json) and, for a tracker that stores files, the report's PNGs."""
    paths = [run_dir / ckpt.CONFIG_FILE, run_dir / ckpt.RUN_FILE, run_dir / ckpt.METRICS_FILE]
    if not any(t.stores_files for t in trackers.trackers):
        return paths
    from sdlora_dist.report import write_report

    files = write_report(run_dir, None)
    return [*paths, files.markdown, *files.images.values()]


def run_task(
    cfg: Config,
    model: SDLoRAViT,
    task: int,
    manifest: Manifest,
    env: dist.DistEnv,
    spec: TransformSpec,
    progress: RunProgress,
    trackers: Trackers | None = None,
) -> TaskRecord:
    """Consolidate the previous task, then train, evaluate, verify and checkpoint ``task``."""
    trackers = trackers or Trackers([])
    offset = progress.steps
    times: dict[str, float] = {}
    decision = None
    model.inference_head = None  # tasks train with the paper's head; train.head=ridge re-solves after training
    pairs = drift.before_task(cfg, model, task, env, spec, manifest, times)  # drift on: the model as task-1 left it
    with timed(times, "consolidate"):
        # float32 here whatever train.precision (release_engine): the frozen directions' norms and KD's
        # least-squares fit must not inherit bf16's 8 significant bits
        if model.current_key is not None:
            decision = consolidate_everywhere(model)
    torch.manual_seed(cfg.train.seed * 1000 + task)  # the new pair's init does not depend on earlier tasks' RNG use
    model.add_task(manifest.classes_per_task[task])
    model.to(env.device)
    with timed(times, "train"):
        train_stats = _train_task_preemptible(TaskContext(cfg, model, env, spec, manifest, task, trackers, offset))
    pairs = drift.after_task(cfg, model, task, env, spec, manifest, pairs, times)  # None unless drift/ridge
    # 'none' does nothing; with gaussian, pairs is set only when train.drift is on (ridge excludes gaussian)
    aligned = head_align.run(cfg, model, task, env, spec, manifest, evaluate, times, pairs)
    head_stats = aligned.stats
    if cfg.train.head == "ridge":
        head_stats = ridge_head.run(cfg, model, task, env, pairs, times)
    seen = model.class_offset(task + 1)
    confusion = torch.zeros(seen, seen, dtype=torch.long)
    with timed(times, "eval"):
        correct, totals = evaluate(cfg, model, task, env, spec, manifest, confusion=confusion)
    dist.assert_ranks_agree(adapter_checksum(model), f"adapter state after task {task}")
    progress.log.add_row(correct, totals)
    class_correct, progress.class_totals = class_counts(confusion.tolist())
    progress.class_correct.append(class_correct)
    progress.confusion = confusion.tolist()
    record = TaskRecord(
        task=task,
        classes=manifest.classes_per_task[task],
        rank=model.adapters[0].lora_A[model.current_key].shape[1] if model.current_key else None,
        consolidation_of_previous=decision,
        magnitudes={k: p.detach().float().cpu().tolist() for k, p in model.magnitudes.values.items()},
        train=train_stats,
        world_size=env.world_size,
        head_align=aligned.record(correct, totals),
        **extra_heads_record(cfg),
        time_s=times,
    )
    progress.tasks.append(record)
    run_dir = Path(cfg.run_dir)
    trackers.flush()  # the task's steps before its checkpoint: a finished task is never replayed
    ckpt.save_task_checkpoint(  # rank 0 only; sets times["checkpoint"] (shared by record) before serialising
        run_dir, task, model, {"record": record.to_dict(), "correct": correct, "totals": totals,
                               "class_correct": class_correct, "class_totals": progress.class_totals,
                               "confusion": progress.confusion}, times=times,
        metrics=progress.to_dict(), metrics_csv=matrix_csv(progress.log),
        discard=ckpt.task_folder(run_dir / ENGINE_DIR, task), head_stats=head_stats,
    )  # fmt: skip
    dist.barrier()
    summary = progress.log.to_dict()
    trackers.log({"accuracy/acc": summary["acc"], "accuracy/aaa": summary["aaa"]}
                 | {f"accuracy/task_{j:02d}": v for j, v in enumerate(progress.log.matrix()[-1])},
                 offset + train_stats.steps)  # fmt: skip
    trackers.flush()
    if is_rank_zero() and any(isinstance(t, TensorBoardTracker) for t in trackers.trackers):
        write_tensorboard(run_dir, progress)
    return record


def extra_heads_record(cfg: Config) -> dict[str, str]:
    """``head`` and ``drift`` for the task record when either is not the paper's (records stay as before)."""
    t = cfg.train
    return {"head": t.head, "drift": t.drift} if t.head != "linear" or t.drift != "none" else {}


def write_tensorboard(run_dir: Path, progress: RunProgress) -> None:
    """Scalars of the newest task under RUN_DIR/tensorboard, when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency: metrics.json always has the same numbers
        return
    task = progress.log.num_tasks - 1
    record = progress.tasks[-1]
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        writer.add_scalar("accuracy/top1_seen", progress.log.top1_curve()[-1], task)
        for j, value in enumerate(progress.log.matrix()[-1]):
            writer.add_scalar(f"accuracy/task_{j:02d}", value, task)
        writer.add_scalar("train/final_loss", record.train.final_loss, task)
        for key, values in record.magnitudes.items():
            writer.add_scalar(f"magnitude/{key}", sum(values) / len(values), task)
        for phase, seconds in record.time_s.items():
            writer.add_scalar(f"time_s/{phase}", seconds, task)
