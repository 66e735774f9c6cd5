"""Experiment tracking: per-step training scalars and per-task accuracy to csv, TensorBoard, MLflow and W&B.

``train.report_to`` names the trackers (null: csv, plus TensorBoard when installed). Only rank 0 tracks. The step
axis is the run's optimizer step counted across tasks (previous tasks' steps + this task's), so it keeps rising
across tasks and across ``--resume``: a resumed run first drops what was logged past its restart point (csv,
TensorBoard's purge) or skips the steps the tracker already holds (MLflow), because the replay is exact.

Logging a step only buffers (no disk write, no request on rank 0 while the other ranks wait at the next
collective); :meth:`Trackers.flush` sends it all before every engine checkpoint and after every task, so whatever a
crash loses lies after the newest checkpoint and is logged again by the exact replay of ``--resume``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sdlora_dist.errors import UserError
from sdlora_dist.fileio import atomic_write_text
from sdlora_dist.logs import log_warning

TRACKING_DIR = "tracking"  # RUN_DIR/tracking: steps.csv and the external trackers' run ids
STEPS_CSV = "steps.csv"
MLFLOW_BATCH = 1000  # MLflow's limit on metrics in one log_batch request
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> package/extra


class Tracker(Protocol):
    """One tracking backend: scalars at a step, files as artifacts, then close."""

    stores_files: bool  # True when artifacts are copied to the tracker (the report is then rendered for it)

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def artifact(self, path: Path) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class CsvTracker:
    """``RUN_DIR/tracking/steps.csv`` in long form (step, metric, value): any metric, one row each."""

    stores_files = False  # the run directory is its store

    def __init__(self, run_dir: Path, start_step: int, **_: Any) -> None:
        self.path = run_dir / TRACKING_DIR / STEPS_CSV
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # resume: rows past the restart point are replayed, drop them first
            with self.path.open(newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            kept = [r for r in rows if len(r) == 3 and int(r[0]) <= start_step]
            atomic_write_text(self.path, "".join(",".join(r) + "\n" for r in [["step", "metric", "value"], *kept]))
        else:
            atomic_write_text(self.path, "step,metric,value\n")
        self.file = self.path.open("a", newline="")
        self.writer = csv.writer(self.file)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.writer.writerows([step, k, repr(float(v))] for k, v in metrics.items())

    def flush(self) -> None:
        self.file.flush()

    def artifact(self, path: Path) -> None:
        """Nothing to do: the run directory already holds the file."""

    def close(self, failed: bool = False) -> None:
        self.file.close()


class TensorBoardTracker:
    """Event files under ``RUN_DIR/tensorboard``; on resume, TensorBoard's purge hides the replayed steps."""

    stores_files = False

    def __init__(self, run_dir: Path, start_step: int, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        """Nothing to do: the run directory already holds the file."""

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value)[:500]  # MLflow's limit on a parameter value
    return out


class MlflowTracker:
    """A run on the MLflow tracking server of ``MLFLOW_TRACKING_URI`` (experiment ``MLFLOW_EXPERIMENT_NAME``, default
    ``sdlora-<benchmark>``); its id is kept in RUN_DIR/tracking/mlflow.json so --resume continues the same run."""

    stores_files = True

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any], **_: Any) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.ids = run_dir / TRACKING_DIR / "mlflow.json"
        run_id = _read_json(self.ids).get("run_id")
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"sdlora-{config['data']['benchmark']}"
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            self._params(run_id, config)
            atomic_write_text(self.ids, json.dumps({"run_id": run_id, "experiment": name}) + "\n")
        self.run_id = run_id
        history = self.client.get_metric_history(run_id, "train/loss")  # steps already held: the replay skips them
        self.logged = max((m.step for m in history), default=0)
        self.pending: list[Any] = []  # metrics not sent yet (one request per flush, not per step)

    def _params(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit on parameters
            self.client.log_batch(run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged and "train/loss" in metrics:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= MLFLOW_BATCH:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + MLFLOW_BATCH])
        self.pending = []

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """A Weights & Biases run (``WANDB_PROJECT``, default ``sdlora``; ``WANDB_MODE=offline`` writes only local files
    under RUN_DIR/tracking/wandb); its id is kept so --resume continues the same run."""

    stores_files = True

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any], **_: Any) -> None:
        import wandb

        folder = run_dir / TRACKING_DIR
        ids = folder / "wandb.json"
        run_id = _read_json(ids).get("run_id") or uuid.uuid4().hex[:8]  # W&B run ids: short, lowercase
        atomic_write_text(ids, json.dumps({"run_id": run_id}) + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "sdlora"), dir=str(folder), id=run_id, resume="allow",
            name=run_dir.name, config=config, settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip
        self.start, self.base = start_step, run_dir.parent

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.start or "train/loss" not in metrics:
            self.run.log(dict(metrics), step=step)

    def flush(self) -> None:
        """Nothing to do: wandb sends from its own process."""

    def artifact(self, path: Path) -> None:
        # under files/<run dir name>/: W&B writes its own config.yaml in files/
        self.run.save(str(path), base_path=str(self.base), policy="now")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# train.report_to name -> the tracker's constructor (run_dir, start_step, config)
TRACKERS: dict[str, Callable[..., Tracker]] = {
    "csv": CsvTracker, "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker,
}  # fmt: skip


def installed(name: str) -> bool:
    """Whether the package a tracker needs is importable (csv needs none)."""
    package = TRACKER_PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None


def resolve(report_to: list[str] | None) -> list[str]:
    """The trackers to open: the configured ones (a missing package is one error naming its extra), or by default
    csv plus TensorBoard when installed (saying so when it is not)."""
    if report_to is None:
        if installed("tensorboard"):
            return ["csv", "tensorboard"]
        log_warning("tracking: TensorBoard is not installed, steps go to RUN_DIR/tracking/steps.csv only "
                    "(pip install 'sdlora-dist[tensorboard]' adds it)")  # fmt: skip
        return ["csv"]
    for name in report_to:
        if not installed(name):
            raise UserError(
                f"train.report_to lists {name!r} but the Python package {TRACKER_PACKAGES[name]!r} is not installed: "
                f"pip install 'sdlora-dist[{name}]', or remove it from train.report_to"
            )
    return list(dict.fromkeys(report_to))


class Trackers:
    """Every tracker of the run as one; empty (does nothing) on ranks other than 0."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, names: list[str], run_dir: Path, start_step: int, config: dict[str, Any]) -> Trackers:
        """Open ``names`` for the run in ``run_dir`` that continues after global step ``start_step``."""
        return cls([TRACKERS[n](run_dir=run_dir.absolute(), start_step=start_step, config=config) for n in names])

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at global step ``step``."""
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def flush(self) -> None:
        """Write or send what every tracker buffered (before an engine checkpoint, after a task)."""
        for tracker in self.trackers:
            tracker.flush()

    def artifacts(self, paths: list[Path]) -> None:
        """Attach the files that exist (config, lineage, report PNGs) to the tracked run."""
        for tracker in self.trackers:
            for path in paths:
                if path.is_file():
                    tracker.artifact(path)

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker (``failed``: the run ended with an error)."""
        for tracker in self.trackers:
            tracker.close(failed=failed)


def read_steps_csv(run_dir: str | Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) rows of one metric from ``RUN_DIR/tracking/steps.csv``, in file order."""
    with (Path(run_dir) / TRACKING_DIR / STEPS_CSV).open(newline="") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["metric"] == metric]
