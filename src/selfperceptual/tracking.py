"""MLflow as a sink: stages write their results locally, then push them here in one go.

The tracking URI is ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (the repository
root, where Snakemake and DVC run every stage). Parallel jobs share one SQLite file, so every
call retries while the database is locked, and ``prepare`` creates the schema and the experiment
before any job starts (concurrent first use races on the schema migration).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path

EXECUTION_ENV = "SP_PIPELINE_EXECUTION"  # groups the runs of one pipeline execution
RETRY_SECONDS = 120


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(scale: str) -> str:
    return f"self-perceptual-{scale}"


SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}


def _launcher() -> str:
    """The nearest ancestor process that is not a shell (``dvc repro``, say), as name-pid-start:
    every stage one ``dvc repro`` runs has the same one, and no other process ever will."""
    try:
        pid = os.getppid()
        while True:
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            parent, started = int(fields[1]), fields[19]
            if name not in SHELLS or parent <= 1:
                return f"{name}-{pid}-{started}"
            pid = parent
    except (OSError, ValueError, IndexError):  # no /proc (not Linux)
        return f"standalone-{uuid.uuid4().hex[:8]}"


def execution_id() -> str:
    """The pipeline execution this process belongs to: SP_PIPELINE_EXECUTION (the Snakefile sets
    it for all its jobs), else the process that launched this stage."""
    return os.environ.get(EXECUTION_ENV) or _launcher()


def _client():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient(tracking_uri())


def _retry(call, *args, **kwargs):
    """Runs one MLflow call, retrying while another job holds the SQLite lock."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:  # MlflowException wraps sqlalchemy's OperationalError
            message = str(error).lower()
            if not ("locked" in message or "busy" in message) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.2, 1.0))


def prepare(scale: str) -> str:
    """Creates the tracking database and the scale's experiment; returns the experiment id."""
    client = _client()
    experiment = _retry(client.get_experiment_by_name, experiment_name(scale))
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (Path.cwd() / "mlartifacts").as_uri()
    try:
        return _retry(client.create_experiment, experiment_name(scale), artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it in between
        return _retry(client.get_experiment_by_name, experiment_name(scale)).experiment_id


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_run(
    scale: str,
    stage: str,
    params: dict,
    tags: dict,
    metrics: dict[str, float] | None = None,
    series: dict[str, list[tuple[int, float]]] | None = None,
    images: list[Path] = (),
    artifacts: list[Path] = (),
) -> str:
    """Creates one finished run: params, tags, final metrics, metric series and image files."""
    from mlflow.entities import Metric, Param

    client = _client()
    experiment_id = prepare(scale)
    all_tags = {"stage": stage, "scale": scale, "pipeline_execution": execution_id(), **tags}
    run = _retry(client.create_run, experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=stage)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
    for key, points in (series or {}).items():
        entries.extend(Metric(key, float(value), now, int(step)) for step, value in points)
    param_entries = [Param(k, v[:6000]) for k, v in _flatten(params).items()]
    for start in range(0, max(len(entries), len(param_entries)), 100):
        _retry(client.log_batch, run_id, metrics=entries[start : start + 100], params=param_entries[start : start + 100])
    for path in images:
        _retry(client.log_artifact, run_id, str(path), "images")
    for path in artifacts:
        _retry(client.log_artifact, run_id, str(path))
    _retry(client.set_terminated, run_id, "FINISHED")
    return run_id
