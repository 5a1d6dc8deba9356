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
import subprocess
import sys
from dataclasses import dataclass

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
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + position) for position in positions]


def in_launched_process() -> bool:
    """True inside a process that torchrun (or accelerate launch) started."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


ACCELERATE_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # train.precision -> accelerate's mixed_precision
NODE_LAUNCHER_ENV = "SP_NODE_LAUNCHER"  # set on the one task per node that srun starts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: plain names directly, compressed ones through scontrol."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout.split()
    return hosts[0]


def _torchrun(nodes: int, node_rank: int, per_node: int, master: str, port: int, argv: list[str]) -> list[str]:
    rendezvous = ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--master-addr={master}", f"--master-port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={per_node}", "-m", "selfperceptual", *argv]


def launch_command(argv: list[str], num_gpus: int, env=os.environ) -> list[str] | None:
    """The command that runs a training stage over its whole allocation, or None when this
    process is all there is to run (one node with one GPU or none, or already launched).

    One node: torchrun with one process per GPU. Several nodes (SLURM_NNODES > 1, from
    ``resources.train.nodes``): srun starts this stage once per node, and each of those starts
    torchrun for its node, with the rendezvous at the allocation's first host on a port derived
    from the job id. Every process then takes global_batch / (all processes) samples.
    """
    if "LOCAL_RANK" in env:
        return None
    nodes, per_node = int(env.get("SLURM_NNODES", "1")), max(1, num_gpus)
    if nodes > 1 and NODE_LAUNCHER_ENV not in env:
        return ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                f"--export=ALL,{NODE_LAUNCHER_ENV}=1", sys.executable, "-m", "selfperceptual", *argv]
    if nodes > 1:
        port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return _torchrun(nodes, int(env["SLURM_NODEID"]), per_node, first_host(env["SLURM_JOB_NODELIST"]), port, argv)
    if num_gpus <= 1:
        return None
    return _torchrun(1, 0, per_node, "", 0, argv)
