"""Training survives its failures: checkpoints, SIGTERM and SIGKILL, bit-for-bit resume, live
tracking, tracking failures that cost no work, and inputs checked before the first step."""

import json
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import pytest
import torch
from run_checks import image_steps
from workspace import REPO, environment

from selfperceptual.method.models import build_unet
from selfperceptual.method.schedule import Schedule
from selfperceptual.method import objectives
from selfperceptual.method.errors import ModelMismatch
from selfperceptual.method.unet import PerceptualNetwork

pytestmark = pytest.mark.slow
UNET_FILE = "pipeline/unet/diffusion_pytorch_model.safetensors"
STEPS = 150  # long enough that each interruption lands halfway, on a loaded machine too


def _train_command(runs, out, checkpoints, *settings):
    return [sys.executable, "-m", "selfperceptual", "train", "--params", str(REPO / "params.yaml"), "--scale", "smoke",
            "--out", str(out), "--data", str(runs / "encode"), "--init", str(runs / "base"), "--objective", "mse",
            "--conditioning", "text", "--checkpoints", str(checkpoints), "--set", f"train.mse.num_steps={STEPS}",
            "--set", "train.checkpoint_every_steps=10", "--set", "train.log_every_steps=5",
            "--set", "train.preview_every_steps=50", *settings]


def _start(command, cwd, **env):
    return subprocess.Popen(command, cwd=cwd, env={**environment(), "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _latest_checkpoint(checkpoints) -> int:
    return max((int(path.name.split("-")[1]) for path in checkpoints.glob("*/run-*/step-*")), default=0)


def _wait_for_checkpoint(process, checkpoints, step):
    """Until a checkpoint of ``step`` or later is on disk (the process must still be training)."""
    deadline = time.monotonic() + 300
    while _latest_checkpoint(checkpoints) < step:
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _client(folder):
    return mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def _train_runs(folder):
    client = _client(folder)
    experiment = client.get_experiment_by_name("self-perceptual-smoke")
    return client, experiment, client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'train'")


def test_sigterm_then_sigkill_then_resume_gives_the_uninterrupted_weights(smoke_stages, tmp_path):
    runs = smoke_stages
    whole = tmp_path / "whole"
    whole.mkdir()
    code, output = _finish(_start(_train_command(runs, whole / "out", whole / "checkpoints"), whole))
    assert code == 0, output[-3000:]

    work = tmp_path / "interrupted"
    work.mkdir()
    out, checkpoints = work / "out", work / "checkpoints"
    command = _train_command(runs, out, checkpoints)

    # SIGTERM (a SLURM time limit): the stage checkpoints the step it is on and exits 143.
    process = _start(command, work)
    _wait_for_checkpoint(process, checkpoints, 10)
    client, experiment, (live,) = _train_runs(work)
    assert live.info.status == "RUNNING" and len(client.get_metric_history(live.info.run_id, "loss")) >= 2  # live from the start
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs, not traces
    process.send_signal(signal.SIGTERM)
    code, output = _finish(process)
    assert code == 143, output[-3000:]
    stopped = _latest_checkpoint(checkpoints)
    assert 10 <= stopped < STEPS and not out.exists()
    assert _client(work).get_run(live.info.run_id).info.status == "KILLED"

    # SIGKILL (a crash, a lost node): nothing runs, the checkpoints on disk are all there is.
    process = _start(command, work)
    _wait_for_checkpoint(process, checkpoints, stopped + 10)
    process.kill()
    process.wait()
    assert not out.exists()

    code, output = _finish(_start(command, work))
    assert code == 0, output[-3000:]
    assert "resuming from" in output
    assert (out / UNET_FILE).read_bytes() == (whole / "out" / UNET_FILE).read_bytes()
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] > 0
    assert len(list(checkpoints.glob("*/run-*/step-*"))) == 2  # train.keep_checkpoints
    client, _, (run,) = _train_runs(work)  # the resumed stage continued the same MLflow run
    assert run.info.run_id == live.info.run_id and run.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == STEPS
    assert {50, STEPS} <= set(image_steps(client, run.info.run_id, "preview"))  # the UI's step slider: a preview sheet per step


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_tracking_failure_keeps_the_trained_model_and_a_rerun_only_reports(smoke_stages, tmp_path):
    runs = smoke_stages
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    command = _train_command(runs, out, checkpoints, "--set", "train.mse.num_steps=10")
    unreachable = f"http://127.0.0.1:{_closed_port()}"
    code, output = _finish(_start(command, tmp_path, MLFLOW_TRACKING_URI=unreachable))  # MLflow's HTTP settings as tracking.py sets them
    assert code == 3, output[-3000:]
    assert f"error: MLflow tracking at {unreachable} failed" in output
    assert (out / UNET_FILE).is_file() and (out / "loss_curve.json").is_file() and (out / "metrics.json").is_file()
    trained = (out / UNET_FILE).read_bytes()

    code, output = _finish(_start(command, tmp_path))  # the default store, reachable
    assert code == 0, output[-3000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 10  # nothing trained again
    assert (out / UNET_FILE).read_bytes() == trained
    client, _, (run,) = _train_runs(tmp_path)
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]

    # The stage finished: run again (snakemake --forceall, say), it trains anew, in a run of its own,
    # and leaves the finished one as it was; the finished execution's checkpoints go.
    code, output = _finish(_start(command, tmp_path))
    assert code == 0, output[-3000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 0 and "resuming from" not in output
    assert (out / UNET_FILE).read_bytes() == trained  # the same training, from the start
    client, _, runs_now = _train_runs(tmp_path)
    first = next(r for r in runs_now if r.info.run_id == run.info.run_id)
    assert len(runs_now) == 2 and first.info.end_time == run.info.end_time and all(r.info.status == "FINISHED" for r in runs_now)
    assert [path.name for path in checkpoints.glob("*/run-*")] == ["run-2"]


def test_a_tracking_server_that_never_answers_costs_seconds_not_minutes(smoke_stages, tmp_path):
    """A server that accepts connections and never answers: MLflow's defaults (7 retries, backoff
    factor 2, 120 s a request) held training for minutes; tracking.py's give up in seconds, once,
    and the stage finishes its outputs, then exits 3 to be run again to report."""
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        started = time.monotonic()
        code, output = _finish(_start(_train_command(smoke_stages, out, checkpoints, "--set", "train.mse.num_steps=10"), tmp_path,
                                      MLFLOW_TRACKING_URI=f"http://127.0.0.1:{silent.getsockname()[1]}"))  # fmt: skip
        seconds = time.monotonic() - started
    finally:
        silent.close()
    assert code == 3 and "error: MLflow tracking at http://127.0.0.1:" in output, output[-3000:]
    assert (out / UNET_FILE).is_file() and (out / "metrics.json").is_file()
    assert seconds < 150, f"{seconds:.0f} s: the silent server held the stage for minutes"  # one try of 3 x 5 s, not 7 x 120 s


def test_a_run_the_tracking_store_lost_is_replaced_by_a_new_one(smoke_stages, tmp_path):
    """The store made anew at the same address (mlflow.db deleted for a clean start): a stopped
    training resumes in a new run tagged with the old id, and a finished stage runs again too."""
    import shutil

    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    command = _train_command(smoke_stages, out, checkpoints, "--set", "train.mse.num_steps=10")

    def train_runs(read: str):  # from a copy: MLflow keeps one engine per URI, open on a deleted file's inode
        (tmp_path / read).mkdir()
        shutil.copy(tmp_path / "mlflow.db", tmp_path / read / "mlflow.db")
        return _train_runs(tmp_path / read)[2]

    assert _finish(_start(command, tmp_path))[0] == 0
    (first,) = train_runs("first")
    (finished,) = checkpoints.glob("*/run-1/finished.json")
    finished.unlink()  # as if stopped after its last checkpoint
    (tmp_path / "mlflow.db").unlink()
    code, output = _finish(_start(command, tmp_path))
    assert code == 0, output[-3000:]
    assert f"the MLflow run {first.info.run_id} these checkpoints were trained under is not in the store" in output
    (second,) = train_runs("second")
    assert second.data.tags["replaces_run_id"] == first.info.run_id and second.info.status == "FINISHED"
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 10
    (tmp_path / "mlflow.db").unlink()  # and once more, now that the stage has finished
    code, output = _finish(_start(command, tmp_path))
    assert code == 0, output[-3000:]
    (third,) = train_runs("third")
    assert third.info.status == "FINISHED" and "replaces_run_id" not in third.data.tags


def test_a_frozen_network_of_another_model_is_refused_naming_both(tmp_path, tiny_unet, smoke_config):
    schedule, sp, starting = Schedule.zero_snr(), objectives.get("sp"), SimpleNamespace(unet=tiny_unet)
    frozen = tmp_path / "freeze"
    (frozen / "network").mkdir(parents=True)
    (frozen / "summary.json").write_text(json.dumps({"source": "runs/smoke/train_mse_uncond"}))
    other = build_unet(type("U", (), {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_heads": 2, "norm_num_groups": 8})(),
                       sample_size=8, latent_channels=4, cross_attention_dim=32, seed=1)
    other.save_pretrained(frozen / "network")
    with pytest.raises(ModelMismatch, match=r"frozen from runs/smoke/train_mse_uncond\) is not a frozen copy of the model being trained: other weights") as refused:
        sp.loss(smoke_config.train.sp, schedule, starting, {"perceptual": frozen})
    assert refused.value.input == "perceptual" and refused.value.path == frozen
    wider = build_unet(type("U", (), {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_heads": 2, "norm_num_groups": 8})(),
                       sample_size=8, latent_channels=4, cross_attention_dim=32, seed=0)
    wider.save_pretrained(frozen / "network")
    with pytest.raises(ModelMismatch, match=r"another architecture \(block_out_channels: \[32, 32\] vs \[16, 32\]"):
        sp.loss(smoke_config.train.sp, schedule, starting, {"perceptual": frozen})
    tiny_unet.save_pretrained(frozen / "network")
    loss = sp.loss(smoke_config.train.sp, schedule, starting, {"perceptual": frozen})
    assert isinstance(loss.perceptual, PerceptualNetwork) and not any(p.requires_grad for p in loss.perceptual.parameters())
    assert torch.equal(loss.perceptual.conv_in.weight, tiny_unet.conv_in.weight)


def test_a_broken_init_fails_before_the_first_step(smoke_stages, tmp_path, capsys):
    import shutil

    from selfperceptual.pipeline.cli import main

    init = tmp_path / "init"
    shutil.copytree(smoke_stages / "base", init)
    vae = init / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:1000])  # truncated: found at load time, not at save time
    code = main(["train", "--params", str(REPO / "params.yaml"), "--scale", "smoke", "--out", str(tmp_path / "out"), "--data", str(smoke_stages / "encode"),
                 "--init", str(init), "--objective", "mse", "--conditioning", "text", "--checkpoints", str(tmp_path / "checkpoints")])  # fmt: skip
    assert code == 1 and f"error: --init {init}: cannot load the pipeline" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "out").exists()
