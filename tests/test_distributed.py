"""Training on several processes: the launch command, the batch plan, and the same result for any split."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_stage
from test_training import _latent_folder
from workspace import REPO, environment

from selfperceptual.pipeline.distributed import NODE_LAUNCHER_ENV, BatchPlan, launch_command
from selfperceptual.method.losses import SelfPerceptualLoss
from selfperceptual.method.models import load_unet
from selfperceptual.method.schedule import Schedule
from selfperceptual.pipeline.training import train
from selfperceptual.method.unet import PerceptualNetwork


def assert_same_updates(start, one, two):
    """Two trainings from ``start`` moved the weights alike. Adam divides by the gradient's
    magnitude, so float-sum noise in a near-zero gradient can show as a part of a step in a few
    weights: the differences are compared with how far the weights moved, on average and at most."""
    moved = torch.cat([(one[k] - start[k]).abs().flatten() for k in start])
    differs = torch.cat([(one[k] - two[k]).abs().flatten() for k in start])
    assert moved.mean() > 1e-5, "training did not move the weights"
    assert differs.mean() < 1e-4 * moved.mean() and differs.max() < 0.1 * moved.max(), (
        f"moved {moved.mean():.3g} on average, {moved.max():.3g} at most; the runs differ by {differs.mean():.3g}, {differs.max():.3g}"
    )


def test_batch_plan_keeps_the_global_batch():
    paper = BatchPlan.derive(896, 8, 32)
    assert (paper.per_device, paper.accumulation) == (28, 4)
    assert paper.per_device * paper.accumulation * paper.num_processes == 896
    assert (BatchPlan.derive(48, 1, 48).per_device, BatchPlan.derive(48, 1, 48).accumulation) == (48, 1)
    assert (BatchPlan.derive(48, 1, 20).per_device, BatchPlan.derive(48, 1, 20).accumulation) == (16, 3)
    assert (BatchPlan.derive(896, 4, 32).per_device, BatchPlan.derive(896, 4, 32).accumulation) == (32, 7)
    plan = BatchPlan.derive(12, 2, 3)
    assert [plan.samples_of(rank) for rank in range(2)] == [range(6), range(6, 12)]
    assert plan.micro_batches() == [slice(0, 3), slice(3, 6)]
    with pytest.raises(ValueError, match="train.global_batch"):
        BatchPlan.derive(10, 4, 32)


def test_launch_command_uses_every_allocated_gpu_on_every_node():
    argv = ["train", "--data", "runs/paper/encode_part0", "--objective", "mse"]
    command = launch_command(argv, 8, {})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc-per-node=8" in command
    assert command[-len(argv) - 2 :] == ["-m", "selfperceptual", *argv]
    assert launch_command(argv, 1, {}) is None and launch_command(argv, 0, {}) is None
    assert launch_command(argv, 8, {"LOCAL_RANK": "0"}) is None  # already one of the launched processes
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu17,gpu18", "SLURM_JOB_ID": "4242"}  # a batch script's
    per_node = launch_command(argv, 8, slurm)  # the job's one task: one task per node through srun
    assert per_node[0] == "srun" and "--nodes=2" in per_node and "--ntasks-per-node=1" in per_node
    assert f"--export=ALL,{NODE_LAUNCHER_ENV}=2:gpu17" in per_node and per_node[-len(argv) :] == argv
    node = launch_command(argv, 8, {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", NODE_LAUNCHER_ENV: "2:gpu17"})  # that task, on the second node
    for flag in ("--nnodes=2", "--node-rank=1", "--master-addr=gpu17", "--master-port=24242", "--nproc-per-node=8"):
        assert flag in node


def test_accumulation_does_not_change_training(tmp_path, tiny_unet, smoke_config):
    """The same global batch in 1 micro-batch or in 4 gives the same weights (up to float sums)."""
    data = _latent_folder(tmp_path / "data", count=16)
    schedule = Schedule.zero_snr()
    frozen = PerceptualNetwork.frozen_copy(tiny_unet, "midblock")
    start = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    results = []
    for max_per_device in (8, 2):
        tiny_unet.load_state_dict(start)
        settings = smoke_config.train.model_copy(update={"global_batch": 8, "max_per_device_batch": max_per_device})
        sp = settings.sp.model_copy(update={"num_steps": 3})
        history = train(tiny_unet, data, SelfPerceptualLoss(schedule, frozen), sp, settings, "text", 1000).history
        results.append(({k: v.clone() for k, v in tiny_unet.state_dict().items()}, [point[:2] for point in history.series["loss"]]))
    (one, loss_one), (four, loss_four) = results
    assert_same_updates(start, one, four)
    assert [step for step, _ in loss_one] == [step for step, _ in loss_four]
    assert [loss for _, loss in loss_one] == pytest.approx([loss for _, loss in loss_four], rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one(smoke_stages, tmp_path):
    """A real two-process data-parallel run (torchrun, gloo on the CPU) through the train stage."""
    runs = smoke_stages
    args = ["train", "--params", "params.yaml", "--scale", "smoke", "--data", str(runs / "encode"), "--init", str(runs / "base"),
            "--objective", "mse", "--conditioning", "text", "--set", "train.mse.num_steps=3"]
    run_stage("train", tmp_path / "one", *args[5:], "--checkpoints", tmp_path / "one_checkpoints")
    env = {**environment(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "selfperceptual",
               *args, "--out", str(tmp_path / "two"), "--checkpoints", str(tmp_path / "two_checkpoints")]
    result = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = load_unet(tmp_path / "one" / "pipeline").state_dict(), load_unet(tmp_path / "two" / "pipeline").state_dict()
    assert_same_updates(load_unet(runs / "base" / "pipeline").state_dict(), one, two)
    assert not list(tmp_path.glob(".two.*partial"))  # only the first process wrote the output


@pytest.mark.slow
def test_two_nodes_train_like_one_process(smoke_stages, tmp_path):
    """Two "nodes" of a SLURM allocation on loopback: each runs the stage as srun would start it,
    derives its torchrun rendezvous from SLURM's variables, and trains one of two processes (gloo)."""
    runs = smoke_stages
    args = ["train", "--params", str(REPO / "params.yaml"), "--scale", "smoke", "--data", str(runs / "encode"), "--init", str(runs / "base"),
            "--objective", "mse", "--conditioning", "text", "--set", "train.mse.num_steps=3"]
    run_stage("train", tmp_path / "one", *args[5:], "--checkpoints", tmp_path / "one_checkpoints")
    with socket.socket() as sock:  # a free port: the rendezvous port is 20000 + job id % 20000
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slurm = {"SLURM_JOB_ID": str(port - 20000), NODE_LAUNCHER_ENV: "2:127.0.0.1"}
    command = [sys.executable, "-m", "selfperceptual", *args, "--out", str(tmp_path / "two"), "--checkpoints", str(tmp_path / "two_checkpoints")]
    nodes = [
        subprocess.Popen(command, cwd=tmp_path, env={**environment(), "OMP_NUM_THREADS": "1", **slurm, "SLURM_NODEID": str(node)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert "--nnodes=2" in outputs[0] and "--node-rank=1" in outputs[1]
    one, two = load_unet(tmp_path / "one" / "pipeline").state_dict(), load_unet(tmp_path / "two" / "pipeline").state_dict()
    assert_same_updates(load_unet(runs / "base" / "pipeline").state_dict(), one, two)


# Started in every process of a test launch: rank 0's first checkpoint write pauses inside its first
# file for SLOW_CHECKPOINT_S seconds, after marking the file SLOW_CHECKPOINT_MARK.
SLOW_CHECKPOINT = """
import os, time
if os.environ.get("SLOW_CHECKPOINT_S") and os.environ.get("RANK") == "0":
    import safetensors.torch
    _save_file = safetensors.torch.save_file
    def _slow_save_file(tensors, filename, *args, **kwargs):
        mark = os.environ["SLOW_CHECKPOINT_MARK"]
        if not os.path.exists(mark):
            open(mark, "w").close()
            time.sleep(float(os.environ["SLOW_CHECKPOINT_S"]))
        return _save_file(tensors, filename, *args, **kwargs)
    safetensors.torch.save_file = _slow_save_file
"""
# What the train stage runs on a node with two GPUs: the launch command for two processes, through run_launch.
LAUNCH = "import sys; from selfperceptual.pipeline.distributed import launch_command, run_launch; sys.exit(run_launch(launch_command(sys.argv[1:], 2, {})))"


@pytest.mark.slow
def test_sigterm_to_the_launcher_mid_checkpoint_stops_every_rank_after_a_complete_one(smoke_stages, tmp_path):
    """Two processes (torchrun, gloo): SIGTERM reaches the launcher while rank 0 writes a checkpoint
    that takes longer than torchrun's grace would allow (its default, shortened to 2 s here). Every
    rank stops after the same step, rank 0's stop checkpoint is complete, and a rerun resumes to
    weights bit-identical to an uninterrupted run's."""
    runs = smoke_stages
    argv = ["train", "--params", str(REPO / "params.yaml"), "--scale", "smoke", "--data", str(runs / "encode"), "--init", str(runs / "base"),
            "--objective", "mse", "--conditioning", "text", "--set", "train.mse.num_steps=6", "--set", "train.checkpoint_every_steps=2"]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_CHECKPOINT)
    env = {**environment(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "site"), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}

    def launch(name, **extra):  # in a folder of its own: its tracking store (two launches run at once)
        command = [sys.executable, "-c", LAUNCH, *argv, "--out", str(tmp_path / name), "--checkpoints", str(tmp_path / "checkpoints" / name)]
        (tmp_path / f"{name}_cwd").mkdir(exist_ok=True)
        return subprocess.Popen(command, cwd=tmp_path / f"{name}_cwd", env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    reference = launch("reference")
    mark = tmp_path / "writing"
    stopped = launch("stopped", SLOW_CHECKPOINT_S="10", SLOW_CHECKPOINT_MARK=str(mark))
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()[0][-4000:]
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)  # mid-write of the step-2 checkpoint
    output = stopped.communicate(timeout=300)[0]
    assert stopped.returncode == 143, output[-4000:]
    assert output.count("training stopped by SIGTERM after step 3") == 2, output[-4000:]  # both ranks, after the same step
    (configuration,) = (tmp_path / "checkpoints" / "stopped").iterdir()
    (store,) = configuration.glob("run-*")  # this execution's: run-1 (beside it, train.lock)
    assert sorted(path.name for path in store.glob("step-*")) == ["step-00000002", "step-00000003"]
    state = json.loads((store / "step-00000003" / "state.json").read_text())
    assert state["step"] == 3 and {path.name for path in (store / "step-00000003").iterdir()} == {
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}

    resumed = launch("stopped")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resuming from" in output, output[-4000:]
    assert reference.wait(timeout=300) == 0, reference.communicate()[0][-4000:]
    one, two = load_unet(tmp_path / "reference" / "pipeline").state_dict(), load_unet(tmp_path / "stopped" / "pipeline").state_dict()
    assert all(torch.equal(one[key], two[key]) for key in one)
