"""MLflow as a sink: stages write their results locally first, then push them here.

Training and evaluation runs are live (``LiveRun``): created RUNNING as the stage starts, fed (a
training's loss curve and preview sheets) as it goes, continued by a resumed training stage, and
ended FINISHED, FAILED or KILLED. Other stages push one run once their output folder is in place. A
tracking failure never costs the local record: the stage finishes its outputs, then fails with
a ``TrackingError`` naming the tracking URI, and a rerun reports again.

The tracking URI is ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (the repository
root, where Snakemake and DVC run every stage). Parallel jobs share one SQLite file, so every
call retries while the database is locked, and ``prepare`` creates the schema and the experiment
under a file lock, so whichever process comes first does it and the others wait (the Snakefile
also calls it before any job starts; DVC and stages run by hand rely on the lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .io import read_json, write_json

EXECUTION_ENV = "SP_PIPELINE_EXECUTION"  # groups the runs of one pipeline execution
RETRY_SECONDS = 120
# A tracking server that does not answer costs seconds, not minutes: MLflow's own defaults (7
# retries with backoff factor 2, 120 s per request) held a training about 4 minutes before its
# first step. After the first failure a stage's run stops calling the server; the stage finishes
# its outputs and exits 3, and running it again reports them. Set these variables to change it.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# MLflow's UI opens an experiment of this kind on its runs, not on the GenAI traces overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(RuntimeError):
    """The tracking store failed; the stage's local outputs are complete."""


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


_CLIENTS: dict = {}


def _client():
    """This process's client for the tracking URI. Its first use creates or migrates the store's
    schema, which is done under the store's file lock (``_store_lock``)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri not in _CLIENTS:
        with _store_lock():
            client = mlflow.MlflowClient(uri)
            _retry(client.search_experiments, max_results=1)
        _CLIENTS[uri] = client
    return _CLIENTS[uri]


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


@contextmanager
def _store_lock():
    """With a SQLite store, an exclusive lock on ``<database>.lock`` while held: the first process
    creates the schema and the experiment, and the others wait for it (concurrent first use of a
    fresh database races on MLflow's schema migration and can leave it broken)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(scale: str) -> str:
    """Creates the tracking database and the scale's experiment; returns the experiment id."""
    client = _client()
    with _store_lock():  # one process creates the experiment, the others then find it
        return _prepare(client, scale)


def experiment_note(scale: str) -> str:
    """The experiment's description in the UI: what its runs are and the filters that compare them."""
    from .experiments import TABLES

    return "\n".join([
        f"Lin & Yang, *Diffusion Model with Perceptual Loss* (arXiv 2401.00110), rerun at the `{scale}` scale. "
        "Each pipeline execution is a parent run (`tags.kind = 'execution'`) with its stages' runs nested under it.",
        "",
        "Compare: filter the runs with one of these (search box), select them, press *Compare*.",
        "",
        "- Training runs: `tags.kind = 'train'` (loss curves, preview grids); evaluation runs: `tags.kind = 'evaluate'` "
        "(`fid` with `fid_low`/`fid_high`, `is`, `precision`, `recall`, `alignment`, a sample grid).",
        *(f"- {table.title}: `tags.kind = 'evaluate' and tags.tables LIKE '%{key}%'`" for key, table in TABLES.items()),
        "- The peers (LPL, Cas-DM) beside MSE and SP: `tags.comparison = 'peers'`.",
        "- One training seed of the Table 1 and 8 rows: `tags.training_seed = '0'`; one execution: "
        "`tags.pipeline_execution = '<id>'` (its parent run is named `execution <id>`).",
    ])  # fmt: skip


def _prepare(client, scale: str) -> str:
    tags = {**EXPERIMENT_KIND, "mlflow.note.content": experiment_note(scale)}
    experiment = _retry(client.get_experiment_by_name, experiment_name(scale))
    if experiment is not None:
        for key, value in tags.items():
            if experiment.tags.get(key) != value:
                _retry(client.set_experiment_tag, experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (Path.cwd() / "mlartifacts").as_uri()
    try:
        return _retry(client.create_experiment, experiment_name(scale), artifact_location=location, tags=tags)
    except Exception:  # noqa: BLE001 - another process created it in between
        return _retry(client.get_experiment_by_name, experiment_name(scale)).experiment_id


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def _ui_base(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def ui_hint(experiment_id: str) -> str:
    """Where to look at an experiment in the MLflow UI, on its runs (not the GenAI overview)."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {_ui_base(uri)}/{page}"
    return f"MLflow: mlflow ui --backend-store-uri {uri}  then open {LOCAL_UI}/{page}"


def run_link(run_id: str, experiment_id: str, uri: str | None = None) -> str:
    """A run's page in the MLflow UI, in its model-training view: on the tracking server, or on
    ``mlflow ui`` of a local store."""
    return f"{_ui_base(uri or tracking_uri())}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _metrics(values: dict[str, float] | None = None, series: dict[str, list] | None = None, model_id: str | None = None):
    """MLflow metrics: final values (step 0, now; also the logged model ``model_id``'s) and series of
    (step, value[, unix ms]) points."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in (values or {}).items()]
    for key, points in (series or {}).items():
        entries.extend(Metric(key, float(point[1]), int(point[2]) if len(point) > 2 else now, int(point[0])) for point in points)
    return entries


def _log_image(client, run_id: str, key: str, path: Path, step: int) -> None:
    """An MLflow image of ``key`` at ``step``: the run's page shows each key with a step slider, and
    comparing runs shows the same key side by side (a file artifact would show neither)."""
    from PIL import Image

    with Image.open(path) as image:
        _retry(client.log_image, run_id, image.convert("RGB"), key=key, step=step)


def _log_batches(client, run_id: str, metrics=(), params: dict | None = None) -> None:
    from mlflow.entities import Param

    param_entries = [Param(k, v[:6000]) for k, v in _flatten(params or {}).items()]
    for start in range(0, max(len(metrics), len(param_entries)), 100):
        _retry(client.log_batch, run_id, metrics=metrics[start : start + 100], params=param_entries[start : start + 100])


PARENT_KIND = "execution"
_STAGE_STARTED: list[float] = []  # when this process's stage started (cli.main), in seconds
_PARENTS: dict[tuple[str, str, str], tuple[str, str]] = {}  # (uri, experiment, execution) -> (parent run, who ends it)


def stage_started(at: float | None = None) -> float:
    """Notes (``at``) or gives when the stage of this process started: its runs begin then."""
    if at is not None:
        _STAGE_STARTED[:] = [at]
    return _STAGE_STARTED[0] if _STAGE_STARTED else time.time()


def _parent(client, experiment_id: str, scale: str, closed_by: str = "stages") -> tuple[str, str]:
    """The run of this pipeline execution, which its stages' runs nest under, and who ends it: an
    executor that made it at its start (Snakemake), or its stages, each of which
    moves its end to its own (plain ``dvc repro``, stages run by hand). Made once, under the
    store's lock; the first stage of an execution without an executor makes it."""
    execution = execution_id()
    key = (tracking_uri(), experiment_id, execution)
    if key in _PARENTS:  # found once per process: a stage asks when its run starts and when it ends
        return _PARENTS[key]
    query = f"tags.pipeline_execution = '{execution}' and tags.kind = '{PARENT_KIND}'"
    with _store_lock():
        found = _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1)
        if found:
            _PARENTS[key] = found[0].info.run_id, found[0].data.tags.get("closed_by", "stages")
        else:
            tags = {"kind": PARENT_KIND, "pipeline_execution": execution, "scale": scale, "closed_by": closed_by,
                    "mlflow.note.content": f"One execution of the pipeline ({execution}): its stages' runs are nested under this run."}
            run = _retry(client.create_run, experiment_id, tags=tags, run_name=f"execution {execution}", start_time=int(stage_started() * 1000))
            _PARENTS[key] = run.info.run_id, closed_by
    return _PARENTS[key]


def start_execution(scale: str, executor: str) -> str:
    """The parent run of an execution an executor runs (Snakemake's onstart, ``warm --run``); it
    ends it with ``end_execution``."""
    client = _client()
    return _parent(client, prepare(scale), scale, closed_by=executor)[0]


def end_execution(scale: str, status: str) -> None:
    """Ends this execution's parent run (FINISHED, FAILED or KILLED)."""
    try:
        client = _client()
        run_id, _ = _parent(client, prepare(scale), scale)
        _retry(client.set_terminated, run_id, status)
    except Exception as error:  # noqa: BLE001 - the stages' own records are complete
        logging.getLogger("tracking").error("MLflow: the execution's run could not be ended: %s", error)


def _stage_ended(client, scale: str, status: str) -> None:
    """A stage's run ended: a parent its stages close ends with it (its end moves to the latest stage's)."""
    run_id, closed_by = _parent(client, prepare(scale), scale)
    if closed_by == "stages":
        with _store_lock():  # one stage at a time: the end only moves forward
            _retry(client.set_terminated, run_id, "FAILED" if status == "FAILED" else "FINISHED", end_time=int(time.time() * 1000))


def _create_run(client, scale: str, stage: str, tags: dict) -> str:
    experiment_id = prepare(scale)
    parent, _ = _parent(client, experiment_id, scale)
    all_tags = {"stage": stage, "scale": scale, "pipeline_execution": execution_id(), "mlflow.parentRunId": parent, **tags}
    run = _retry(client.create_run, experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=stage,
                 start_time=int(stage_started() * 1000))
    return run.info.run_id


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
    """Creates one finished run: params, tags, final metrics, metric series and image files (figures)."""
    try:
        client = _client()
        run_id = _create_run(client, scale, stage, tags)
        _log_batches(client, run_id, _metrics(metrics, series), params)
        for path in images:
            _retry(client.log_artifact, run_id, str(path), "images")
        for path in artifacts:
            _retry(client.log_artifact, run_id, str(path))
        _retry(client.set_terminated, run_id, "FINISHED")
        _stage_ended(client, scale, "FINISHED")
    except Exception as error:
        raise TrackingError(f"MLflow tracking at {tracking_uri()} failed: {error}") from error
    return run_id


class LiveRun:
    """One stage's live MLflow run: RUNNING from the stage's start, ended with the stage. A
    training stage keeps its id in ``state_file`` (beside its checkpoints), so a resumed stage
    continues the same run; without one (evaluation) every execution is a new run. The first
    failure of the store is remembered and later calls are skipped: the stage goes on, and
    ``raise_if_failed`` reports it once the outputs are safe."""

    def __init__(self, scale: str, stage: str, params: dict, tags: dict, state_file: Path | None = None, system_metrics: bool = True,
                 model_id: str | None = None):  # fmt: skip
        self.error: Exception | None = None
        self.scale, self.stage = scale, stage
        self.run_id: str | None = None
        self.model_id: str | None = None  # the logged model this run evaluates: its input, and its metrics are the model's
        self.experiment_id: str | None = None
        self._client = self._system = None
        saved = read_json(state_file) if state_file is not None and state_file.is_file() else {}
        try:
            self._client = _client()
            self.experiment_id = prepare(scale)
            resumed = saved.get("tracking_uri") == tracking_uri() and bool(saved.get("run_id"))
            replaced = None
            if resumed and not self._exists(saved["run_id"]):  # the store was made anew at the same address
                resumed, replaced = False, saved["run_id"]
            if resumed:
                self.run_id = saved["run_id"]
                _retry(self._client.update_run, self.run_id, status="RUNNING")
            else:
                self.run_id = _create_run(self._client, scale, stage, {**tags, **({"replaces_run_id": replaced} if replaced else {})})
                if replaced:
                    logging.getLogger("tracking").warning(
                        "the MLflow run %s these checkpoints were trained under is not in the store at %s (made anew since?); "
                        "training goes on in a new run, %s, tagged replaces_run_id", replaced, tracking_uri(), self.run_id)
                _log_batches(self._client, self.run_id, [], params)
                if state_file is not None:
                    write_json(state_file, {"run_id": self.run_id, "tracking_uri": tracking_uri()})
            if system_metrics:
                self._watch_system(resumed)
        except Exception as error:  # noqa: BLE001
            self._failed(error)
        if model_id and self.run_id and self.error is None:
            self._link_model(model_id)

    def _link_model(self, model_id: str) -> None:
        """MLflow's lineage: the model as the run's input. A model the store does not have (its
        training ran under another store) leaves the run without it, and says so."""
        from mlflow.entities import LoggedModelInput

        try:
            self._client.get_logged_model(model_id)  # raises for a model this store does not have
            _retry(self._client.log_inputs, self.run_id, models=[LoggedModelInput(model_id)])
            self.model_id = model_id
        except Exception as error:  # noqa: BLE001
            logging.getLogger("tracking").warning("the evaluated model %s is not in the MLflow store at %s (%s); the run is "
                                                  "not linked to it", model_id, tracking_uri(), str(error).splitlines()[0])  # fmt: skip

    def record_model(self, name: str, step: int, tags: dict) -> str | None:
        """Records the model this run trained as an MLflow logged model, made by this run at ``step``
        (its weights stay in the stage's folder, under DVC); the runs that evaluate it take it as their
        input and log their metrics to it, so the experiment's Models tab lists each model with them."""
        from mlflow.entities import LoggedModelOutput

        found: list[str] = []

        def record() -> None:
            model = _retry(self._client.create_logged_model, self.experiment_id, name=name, source_run_id=self.run_id,
                           tags={"stage": self.stage, "scale": self.scale, **{k: str(v) for k, v in tags.items()}})  # fmt: skip
            _retry(self._client.finalize_logged_model, model.model_id, "READY")
            _retry(self._client.log_outputs, self.run_id, [LoggedModelOutput(model.model_id, step)])
            found.append(model.model_id)

        self._call(record)
        return found[0] if found else None

    def _exists(self, run_id: str) -> bool:
        try:
            _retry(self._client.get_run, run_id)
        except Exception as error:
            if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _watch_system(self, resumed: bool) -> None:
        """MLflow's system metrics while the run trains (``system/...``: CPU, memory, disk, network,
        and each GPU's utilisation and memory where NVML finds one), every 10 s
        (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``); a resumed run continues their steps. They
        are the machine's, seen from the first process of the job."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=tracking_uri())
        self._system.start()

    def _failed(self, error: Exception) -> None:
        if self.error is None:
            logging.getLogger("tracking").error("MLflow tracking at %s failed (training goes on, outputs are kept): %s", tracking_uri(), error)
            self.error = error

    def _call(self, action, *args, **kwargs) -> None:
        if self.error is not None or self.run_id is None:
            return
        try:
            action(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self._failed(error)

    def log_points(self, series: dict[str, list]) -> None:
        self._call(lambda: _log_batches(self._client, self.run_id, _metrics(series=series)))

    def log_image(self, key: str, path: Path, step: int) -> None:
        self._call(_log_image, self._client, self.run_id, key, path, step)

    def end(self, status: str, metrics: dict[str, float] | None = None, series: dict | None = None,
            images: dict[str, tuple[Path, int]] | None = None) -> None:  # fmt: skip
        """Sends what may be missing (re-sent points are dropped as duplicates), then ``images``
        (key -> (file, step)), each also as the file at the root of the run's artifacts (the same
        name in every run of a kind: the UI's *Compare* page shows common files side by side),
        then the status."""
        if self._system is not None:
            self._system.finish()  # its last samples, before the run ends
        self._call(lambda: _log_batches(self._client, self.run_id, _metrics(metrics, series, self.model_id)))
        for key, (path, step) in (images or {}).items():
            self.log_image(key, path, step)
            self._call(lambda path=path: _retry(self._client.log_artifact, self.run_id, str(path)))
        self._call(_retry, lambda: self._client.set_terminated(self.run_id, status))
        self._call(_stage_ended, self._client, self.scale, status)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise TrackingError(
                f"MLflow tracking at {tracking_uri()} failed: {self.error}. The outputs are complete on disk; "
                "run the stage again to report them (it resumes from its last checkpoint and trains no further)."
            )

