"""MLflow: parallel jobs on one SQLite file never fail on the database; a stage logs to an MLflow server."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from conftest import run_stage
from PIL import Image
from run_checks import image_steps

from selfperceptual.pipeline import tracking


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
    everything = mlflow.search_runs(experiment_names=["self-perceptual-smoke"])
    (parent,) = everything[everything["tags.kind"] == "execution"]["run_id"]  # made once by 4 processes at once
    runs = everything[everything["tags.kind"] != "execution"]
    assert len(runs) == 8 and set(runs["tags.mlflow.parentRunId"]) == {parent}
    assert set(everything["tags.pipeline_execution"]) == {"test-execution"}
    finished = everything.set_index("run_id")
    assert finished.loc[parent, "status"] == "FINISHED" and finished.loc[parent, "end_time"] >= runs["end_time"].max()  # closed by its stages
    assert sorted(runs["metrics.fid"]) == [float(i) for i in range(8)]
    history = mlflow.MlflowClient().get_metric_history(run_ids[0], "loss")
    assert len(history) == 50
    assert (tmp_path / "mlflow.db").is_file()
    assert os.environ[tracking.EXECUTION_ENV] == "test-execution"


def _log_at_once(barrier, results, index):
    barrier.wait()  # every writer meets the fresh database at the same moment
    results.put(_log(index))


@pytest.mark.parametrize("writers", [8, 16])
def test_a_fresh_database_survives_parallel_first_writers(tmp_path, monkeypatch, writers):
    """No Snakemake onstart before them (DVC's queued experiments, stages run by hand): the first
    process creates the schema and the experiment under the store's file lock, the rest wait."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(writers), context.Queue()
    processes = [context.Process(target=_log_at_once, args=(barrier, results, index)) for index in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * writers
    assert len({results.get(timeout=5) for _ in range(writers)}) == writers
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["self-perceptual-smoke"])
    assert sorted(runs["metrics.fid"].dropna()) == [float(i) for i in range(writers)]
    assert (runs["tags.kind"] == "execution").sum() == 1


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (what jobs on several nodes share instead of SQLite)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # its imports alone take over a minute on a loaded 2-core machine
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_stage_logs_to_an_mlflow_server(mlflow_server, smoke_stages, tmp_path, monkeypatch):
    runs = smoke_stages
    run_stage("featnet", tmp_path / "featnet", "--corpus", runs / "corpus", "--set", "featnet.train_steps=5")
    run_stage("sample", tmp_path / "sample", "--model", runs / "base", "--corpus", runs / "corpus", "--row", "sp_cfg3_r07_s25", "--set", "sample.num_images=8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(tracking.EXECUTION_ENV, "server-test")
    monkeypatch.chdir(tmp_path)  # no SQLite file may appear: everything goes to the server
    run_stage("evaluate", tmp_path / "evaluate", "--samples", tmp_path / "sample", "--featnet", tmp_path / "featnet", "--corpus", runs / "corpus",
              "--set", "sample.num_images=8")
    client = mlflow.MlflowClient(mlflow_server)
    parent, run = sorted(client.search_runs([client.get_experiment_by_name("self-perceptual-smoke").experiment_id]), key=lambda r: r.data.tags["kind"] != "execution")
    assert run.data.tags["row"] == "sp_cfg3_r07_s25" and run.data.tags["pipeline_execution"] == "server-test"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and parent.data.tags["pipeline_execution"] == "server-test"
    assert run.info.end_time - run.info.start_time > 1000  # the run began with the stage, not when it was written
    # It existed while the stage worked: the outputs name it (the report links each row to it).
    assert json.loads((tmp_path / "evaluate" / "tracking.json").read_text())["run_id"] == run.info.run_id
    assert run.data.metrics["fid"] > 0 and run.data.metrics["num_images"] == 8
    assert image_steps(client, run.info.run_id, "samples") == [0]  # one key in every evaluation run: compared side by side
    assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}  # the same file in every evaluation run: Compare shows them
    (name,) = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert Image.open(client.download_artifacts(run.info.run_id, name, str(tmp_path))).width >= 4 * 128  # 8 samples of 32 px, enlarged
    assert not (tmp_path / "mlflow.db").exists()


def test_each_execution_is_a_parent_run_and_a_forced_rerun_trains_in_a_new_run(tmp_path):
    """A Snakemake execution is a parent run with its stages' runs nested under it; forcing a
    finished training stage again trains anew in a new run, under the second execution's parent,
    and leaves the first run as it ended."""
    from run_checks import execution_runs
    from workspace import copy_repository, run

    copy = copy_repository(tmp_path / "repo", scale="smoke")
    target = [sys.executable, "-m", "snakemake", "--cores", "2", "runs/smoke/train_mse"]
    run(target, copy, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})  # a few seconds of training: sample often
    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("self-perceptual-smoke").experiment_id
    (first,) = client.search_runs([experiment], "tags.kind = 'train'")
    # The params that apply to the run: the common training settings and MSE's own, no other objective's.
    assert {"train.global_batch", "train.mse.learning_rate", "schedule.beta_end"} <= set(first.data.params)
    assert not [key for key in first.data.params if key.startswith(("train.sp.", "train.lpl.", "train.casdm."))]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(first.data.metrics)  # MLflow's system metrics
    note = client.get_experiment(experiment).tags["mlflow.note.content"]  # the experiment's description: how to compare
    assert "tags.tables LIKE '%table1%'" in note and "tags.comparison = 'peers'" in note
    run([*target, "--forcerun", "train_mse"], copy)

    parents = execution_runs(copy, "smoke")
    assert len(parents) == 2 and set(parents["status"]) == {"FINISHED"} and set(parents["tags.closed_by"]) == {"snakemake"}
    trained = client.search_runs([experiment], "tags.kind = 'train'", order_by=["attributes.start_time ASC"])
    assert [r.info.run_id for r in trained][:1] == [first.info.run_id] and len(trained) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trained} == set(parents["run_id"])  # one under each execution
    again = trained[1]
    assert trained[0].info.end_time == first.info.end_time and trained[0].info.end_time <= again.info.start_time  # not reopened
    assert again.data.metrics["resumed_from_step"] == 0 and again.info.status == "FINISHED"
    # Each run lasted as long as its stage: at least its training, and not the time between the two executions.
    for record in trained:
        seconds = (record.info.end_time - record.info.start_time) / 1000
        assert record.data.metrics["seconds_per_step"] * record.data.metrics["num_steps"] <= seconds < 300
