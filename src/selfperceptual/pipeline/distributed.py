"""Training on every GPU of an allocation, on one node or several: the launch and the batch plan.

The global batch is what params.yaml says whatever the number of GPUs: each of the N processes
takes a contiguous block of global_batch / N samples and works through it in ``accumulation``
micro-batches of ``per_device`` samples. Every sample draws its randomness from its own
generator, seeded by (seed, step, position in the global batch), so the same step sees the same
samples, noise and timesteps for any N and any accumulation: the runs differ only in the order
floating-point sums are taken.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used
    import torch


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    num_processes: int
    per_device: int
    accumulation: int

    @classmethod
    def derive(cls, global_batch: int, num_processes: int, max_per_device: int) -> BatchPlan:
        """The fewest accumulation steps whose micro-batch fits ``max_per_device`` and divides evenly."""
        if global_batch % num_processes:
            raise ValueError(f"train.global_batch ({global_batch}) is not a multiple of the number of processes (GPUs: {num_processes})")
        per_process = global_batch // num_processes
        accumulation = next(a for a in range(math.ceil(per_process / max_per_device), per_process + 1) if per_process % a == 0)
        return cls(global_batch, num_processes, per_process // accumulation, accumulation)

    def samples_of(self, rank: int) -> range:
        """Positions in the global batch that process ``rank`` trains on."""
        per_process = self.per_device * self.accumulation
        return range(rank * per_process, (rank + 1) * per_process)

    def micro_batches(self) -> list[slice]:
        """The process's samples, ``per_device`` at a time."""
        return [slice(k * self.per_device, (k + 1) * self.per_device) for k in range(self.accumulation)]


def sample_generators(seed: int, step: int, positions: range) -> list[torch.Generator]:
    """One generator per sample of a step (what makes a step independent of how it is split)."""
    import torch  # here: the command line imports this module, and most stages never need torch

    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + position) for position in positions]


def in_launched_process() -> bool:
    """True inside a process that torchrun (or accelerate launch) started."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


ACCELERATE_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # train.precision -> accelerate's mixed_precision
NODE_LAUNCHER_ENV = "SP_NODE_LAUNCHER"  # "<nodes>:<first host>", set on the one task per node that srun starts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: plain names directly, compressed ones through scontrol."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout.split()
    return hosts[0]


def job_nodes(env=os.environ) -> tuple[int, str]:
    """The SLURM job's node count and first host ((1, "") outside SLURM). A batch script's
    environment says so; the one-task step the SLURM executor runs a stage in describes only itself
    (one node, SLURM_JOB_* variables removed or narrowed), so there SLURM is asked."""
    if "SLURM_JOB_ID" not in env:
        return 1, ""
    if "SLURM_JOB_NUM_NODES" in env and "SLURM_JOB_NODELIST" in env:
        return int(env["SLURM_JOB_NUM_NODES"]), first_host(env["SLURM_JOB_NODELIST"])
    listing = subprocess.run(["scontrol", "-o", "show", "job", env["SLURM_JOB_ID"]], capture_output=True, text=True, check=True).stdout
    fields = dict(field.split("=", 1) for field in listing.split() if "=" in field)
    return int(fields["NumNodes"]), first_host(fields["NodeList"])


# What names the job to srun. The rest of SLURM_* in a step's environment describes that step (one
# node, one task), and an srun started with it is held to the step: "Only allocated 1 nodes".
JOB_IDENTITY = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CONF", "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST")


def launch_environment(command: list[str], env=os.environ) -> dict[str, str]:
    """The environment to run ``launch_command``'s command in: for srun, the job's identity without
    the variables of the step it is started from."""
    if command[0] != "srun":
        return dict(env)
    return {key: value for key, value in env.items() if not key.startswith(("SLURM_", "SRUN_", "SBATCH_")) or key in JOB_IDENTITY}


# How long torchrun lets its workers finish after it passes a SIGTERM on, before it kills them: the
# step in progress and the stop checkpoint (UNet, EMA and Adam state, ~14 GB at SD 2.1's size). torchrun's
# own default is 30 s. A cluster's stop signal comes this long before the time limit (cluster.py).
STOP_GRACE_S = 600


def _torchrun(nodes: int, node_rank: int, per_node: int, master: str, port: int, argv: list[str]) -> list[str]:
    rendezvous = ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--master-addr={master}", f"--master-port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={per_node}", f"--shutdown-timeout={STOP_GRACE_S}",
            "-m", "selfperceptual", *argv]


def run_launch(command: list[str], env=os.environ) -> int:
    """Runs ``launch_command``'s command to its end; returns its exit status, or 143 once it was
    stopped by SIGTERM.

    The launcher runs in a session of its own, so a signal meant for this process's group (Ctrl-C,
    Snakemake stopping its jobs) reaches this process alone, which passes SIGTERM or SIGINT on to the
    launcher once and waits for it: torchrun passes it to its workers, which finish their step and
    checkpoint. Inside a SLURM job step SLURM signals every process of the step itself, torchrun
    included; passing it on there would give torchrun a second SIGTERM, on which it stops waiting
    for its workers, so there this process only waits.
    """
    launched = subprocess.Popen(command, env=launch_environment(command, env), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        if signum not in received and "SLURM_STEP_ID" not in env:
            launched.send_signal(signum)
        received.append(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = launched.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + signal.SIGTERM if code and signal.SIGTERM in received else code


def launch_command(argv: list[str], num_gpus: int, env=os.environ) -> list[str] | None:
    """The command that runs a training stage over its whole allocation, or None when this
    process is all there is to run (one node with one GPU or none, or already launched).

    One node: torchrun with one process per GPU. Several nodes (``resources.train.nodes``): srun
    starts this stage once per node, and each of those starts torchrun for its node, with the
    rendezvous at the allocation's first host on a port derived from the job id. Every process then
    takes global_batch / (all processes) samples.
    """
    if "LOCAL_RANK" in env:
        return None
    per_node = max(1, num_gpus)
    if NODE_LAUNCHER_ENV in env:  # one node's launcher, started by the srun below
        nodes, master = env[NODE_LAUNCHER_ENV].split(":", 1)
        port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return _torchrun(int(nodes), int(env["SLURM_NODEID"]), per_node, master, port, argv)
    nodes, master = job_nodes(env)
    if nodes > 1:
        return ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                f"--export=ALL,{NODE_LAUNCHER_ENV}={nodes}:{master}", sys.executable, "-m", "selfperceptual", *argv]
    if num_gpus <= 1:
        return None
    return _torchrun(1, 0, per_node, "", 0, argv)
