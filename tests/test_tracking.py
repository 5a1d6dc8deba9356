"""MLflow on SQLite: parallel jobs never fail on the database."""

import multiprocessing
import os

import mlflow

from selfperceptual import tracking


def _log(index):
    return tracking.log_run("smoke", f"job{index}", {"index": index, "nested": {"a": 1}}, {"objective": "mse"}, metrics={"fid": float(index)}, series={"loss": [(s, 1.0 / (s + 1)) for s in range(50)]})


def test_parallel_jobs_share_one_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.EXECUTION_ENV, "test-execution")
    tracking.prepare("smoke")  # what the Snakefile's onstart does
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(_log, range(8))
    assert len(set(run_ids)) == 8
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["self-perceptual-smoke"])
    assert len(runs) == 8
    assert set(runs["tags.pipeline_execution"]) == {"test-execution"}
    assert sorted(runs["metrics.fid"]) == [float(i) for i in range(8)]
    history = mlflow.MlflowClient().get_metric_history(run_ids[0], "loss")
    assert len(history) == 50
    assert (tmp_path / "mlflow.db").is_file()
    assert os.environ[tracking.EXECUTION_ENV] == "test-execution"
