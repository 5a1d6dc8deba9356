"""The stage server (warm.py): a served stage writes what a new process writes, with its streams,
exit status and signals; what it cannot serve exactly runs as a new process."""

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from workspace import REPO, environment

from selfperceptual.pipeline import warm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    """A server started as the Snakefile starts it, in the environment of the commands (``server.env``)."""
    env = {name: value for name, value in environment().items() if name != "PYTEST_CURRENT_TEST"}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        reason = warm.not_wanted(local=True)
        started = None if reason else warm.start(local=True)
        path = os.environ.get(warm.SERVER_ENV)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if started is None:
        pytest.skip(f"no stage server on this machine: {reason}")
    started.env = {**env, warm.SERVER_ENV: path}
    deadline = time.monotonic() + 300
    while not os.path.exists(path):  # it listens once its imports are done
        assert started.process.poll() is None and time.monotonic() < deadline, "the stage server did not start"
        time.sleep(0.1)
    yield started
    started.stop()
    assert started.process.returncode == 0 and not os.path.exists(started.folder)


def _command(stage, out, *arguments, scale="smoke"):
    return [sys.executable, "-m", "selfperceptual", stage, "--params", str(REPO / "params.yaml"), "--scale", scale,
            "--out", str(out), *map(str, arguments)]


def _run(server, command, served: bool, cwd=None, **env):
    environ = {**server.env, **env}
    if not served:
        environ.pop(warm.SERVER_ENV, None)
    return subprocess.run(command, env=environ, cwd=cwd, capture_output=True, text=True, timeout=900)


def _forks(server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def _same_files(left: Path, right: Path) -> None:
    names = sorted(path.relative_to(left) for path in left.rglob("*") if path.is_file())
    assert names == sorted(path.relative_to(right) for path in right.rglob("*") if path.is_file())
    _, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    assert not mismatch and not errors, mismatch + errors


def test_a_served_stage_writes_what_a_new_process_writes(server, smoke_stages, tmp_path):
    # base trains the tiny VAE with two threads: the fork takes the job's thread count, as a new process does.
    images = smoke_stages / "download"
    served = _run(server, _command("base", tmp_path / "served", "--images", images), served=True, OMP_NUM_THREADS="2")
    assert served.returncode == 0, served.stderr[-3000:]
    assert " base: {" in served.stderr  # the stage's own log line reached the command's stderr
    fresh = _run(server, _command("base", tmp_path / "fresh", "--images", images), served=False, OMP_NUM_THREADS="2")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    _same_files(tmp_path / "served", tmp_path / "fresh")
    # One thread gives other floating-point sums: the served run did take the two it was given.
    one = _run(server, _command("base", tmp_path / "one", "--images", images), served=True, OMP_NUM_THREADS="1")
    assert one.returncode == 0, one.stderr[-3000:]
    weights = "pipeline/vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "one" / weights).read_bytes() != (tmp_path / "served" / weights).read_bytes()


def test_a_served_training_trains_what_a_new_process_trains_and_says_it_was_served(server, smoke_stages, tmp_path):
    """Training is served too: the same weights as a new process's, its run tagged with how it ran
    (a served stage's max RSS counts the server's libraries)."""
    def train(name, served):
        command = _command("train", tmp_path / name, "--data", smoke_stages / "encode", "--init", smoke_stages / "base", "--objective", "mse",
                           "--conditioning", "text", "--checkpoints", tmp_path / f"{name}-checkpoints", "--set", "train.mse.num_steps=4")
        result = _run(server, command, served=served, cwd=tmp_path)  # its MLflow store: tmp_path/mlflow.db
        assert result.returncode == 0 and "in a new process" not in result.stderr, result.stderr[-3000:]
        return result

    before = {fork.pid for fork in _forks(server)}
    train("served", served=True)
    train("fresh", served=False)
    _same_files(tmp_path / "served" / "pipeline", tmp_path / "fresh" / "pipeline")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {run.info.run_name: run.data.tags["process"] for run in client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.kind = 'train'")}
    assert runs == {"served": "served", "fresh": "new"}
    assert not {fork.pid for fork in _forks(server)} - before  # the served one ended and was reaped


def test_a_served_stage_reports_bad_params_on_its_own_stderr(server, tmp_path):
    result = _run(server, _command("corpus", tmp_path / "out", scale="nosuch"), served=True)
    assert result.returncode == 2 and "nosuch" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not _forks(server)


def test_signals_reach_the_served_stage_and_its_end_is_the_command_s(server, smoke_stages, tmp_path):
    for signum in (signal.SIGTERM, signal.SIGKILL):
        before = {fork.pid for fork in _forks(server)}
        command = subprocess.Popen(_command("base", tmp_path / signum.name, "--images", smoke_stages / "download"),
                                   env=server.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (forks := [fork for fork in _forks(server) if fork.pid not in before]):
            assert command.poll() is None and time.monotonic() < deadline, "the stage was not served"
            time.sleep(0.05)
        time.sleep(2)  # at work
        command.send_signal(signum)
        # SIGTERM is passed on and the stage ends by it; a killed command takes its stage with it.
        assert command.wait(timeout=60) == -signum
        _, alive = psutil.wait_procs(forks, timeout=30)
        assert not alive
        assert not (tmp_path / signum.name).exists()  # a stopped stage leaves no output


def test_what_differs_from_the_server_runs_as_a_new_process(server, tmp_path, monkeypatch):
    argv = _command("corpus", tmp_path / "out")[2:]  # as sys.argv: the entry point, then the stage's arguments
    argv[0] = str(REPO / "src" / "selfperceptual" / "__main__.py")
    path = server.env[warm.SERVER_ENV]
    # Thread counts, temporary folders and the shell's working directory are the command's own.
    monkeypatch.setattr(os, "environ", {**server.env, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PWD": str(tmp_path)})
    assert warm.delegate(path, argv) == 0
    assert (tmp_path / "out" / "params.json").is_file()
    # A variable read at import (diffusers' verbosity) set otherwise than the server had it.
    os.environ["DIFFUSERS_VERBOSITY"] = "debug"
    assert warm.delegate(path, argv) is None
    del os.environ["DIFFUSERS_VERBOSITY"]
    os.environ["LOCAL_RANK"] = "0"  # a launched worker of a multi-GPU job
    assert warm.delegate(path, argv) is None
