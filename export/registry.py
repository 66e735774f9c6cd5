"""MLflow model registry (optional extra ``[mlflow]``): each exported file a registered model version with its lineage.

One ``sdlora publish MODEL.onnx --mlflow-uri URI --name NAME [--gate-report REPORT]`` logs the file (and its
lineage as ``lineage.json``) as the artifacts of an MLflow run, registers them as the next version of NAME, tags the
version with the lineage's key fields (``sdlora.*``), and moves the alias ``champion`` to it only when the gate
report says it passed for this very file (same sha256). Without a passing gate the version is registered, never
promoted: whoever serves ``models:/NAME@champion`` keeps the last model that passed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from sdlora_dist.errors import UserError
from sdlora_dist.export.lineage import read_lineage
from sdlora_dist.export.metadata import read_metadata
from sdlora_dist.fileio import file_sha256

CHAMPION = "champion"
EXPERIMENT = "sdlora-models"


def _gate_verdict(report: Path | None, sha256: str) -> str:
    """ "passed", "failed" or "none" (no report); a report about another file is refused."""
    if report is None:
        return "none"
    try:
        data = json.loads(Path(report).read_text())
        judged = data["models"]["new"]["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"--gate-report {report} is not a report written by 'sdlora gate' ({exc})") from exc
    if judged != sha256:
        raise UserError(
            f"--gate-report {report} judged another file (sha256 {judged[:12]}, this one {sha256[:12]}): run "
            "'sdlora gate' on this file first"
        )
    return "passed" if data["passed"] else "failed"


def version_tags(model: Path, sha256: str, verdict: str) -> tuple[dict[str, str], str]:
    """The ``sdlora.*`` tags of a model version, and the full lineage JSON (logged as an artifact)."""
    meta = read_metadata(model)
    lineage = read_lineage(meta, str(model))
    tags = {"sdlora.sha256": sha256, "sdlora.classes": str(meta.num_classes), "sdlora.num_tasks": str(meta.num_tasks),
            "sdlora.config_hash": meta.config_hash, "sdlora.gate": verdict}  # fmt: skip
    if lineage is not None:
        acc = lineage.test_accuracy or {}
        tags |= {"sdlora.run_id": lineage.run_id, "sdlora.task": str(lineage.task),
                 "sdlora.data_fingerprint": lineage.data_fingerprint, "sdlora.split": lineage.split_fingerprint,
                 "sdlora.parent_sha256": lineage.parent_sha256 or "",
                 "sdlora.top1": str(acc.get("top1", ""))}  # fmt: skip
    return tags, (lineage.to_json() if lineage is not None else "{}")


def register_mlflow(
    model: str | Path, uri: str, *, name: str, gate_report: str | Path | None = None
) -> dict[str, Any]:
    """Register ``model`` as the next version of ``name`` on the MLflow server at ``uri``; alias ``champion`` only
    on a passing gate report. Returns ``{"name", "version", "champion", "gate"}``."""
    import mlflow
    from mlflow import MlflowClient

    model = Path(model)
    if not model.is_file():
        raise UserError(f"{model} does not exist: export the model first")
    sha256 = file_sha256(model)
    verdict = _gate_verdict(Path(gate_report) if gate_report else None, sha256)
    tags, lineage_json = version_tags(model, sha256, verdict)
    mlflow.set_tracking_uri(uri)  # the artifact upload (mlflow-artifacts:) resolves the server from it
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # mlflow prints "View run ..." links on stdout: keep stdout for the command's one JSON line
    with contextlib.redirect_stdout(sys.stderr):
        version = _register(client, model, name, tags, lineage_json, verdict, uri)
    return {"name": name, "version": int(version), "champion": verdict == "passed", "gate": verdict}


def _register(
    client: Any, model: Path, name: str, tags: dict[str, str], lineage_json: str, verdict: str, uri: str
) -> str:
    """Run with the file and lineage as artifacts -> model version (tags) -> alias on a pass; the version number."""
    from mlflow.exceptions import MlflowException

    sha256 = tags["sdlora.sha256"]
    try:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        run = client.create_run(experiment_id, tags=tags, run_name=f"{name}-{sha256[:8]}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "lineage.json").write_text(lineage_json)
            client.log_artifact(run.info.run_id, str(Path(tmp) / "lineage.json"), "model")
        client.log_artifact(run.info.run_id, str(model), "model")
        client.set_terminated(run.info.run_id)
        if client.search_registered_models(filter_string=f"name = '{name}'") == []:
            client.create_registered_model(name, description="SD-LoRA class-incremental ViT (sdlora export)")
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags)
        if verdict == "passed":
            client.set_registered_model_alias(name, CHAMPION, version.version)
    except MlflowException as exc:
        raise UserError(f"MLflow at {uri} refused the registration: {str(exc).splitlines()[0][:200]}") from exc
    return version.version
