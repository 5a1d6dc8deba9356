"""Training on every GPU of an allocation: the accelerate launch and the batch plan.

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
    """True inside a process that torchrun / accelerate launch started."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


ACCELERATE_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # train.precision -> accelerate's mixed_precision


def launch_command(argv: list[str], num_gpus: int, precision: str) -> list[str] | None:
    """``accelerate launch`` over ``num_gpus`` GPUs of this node for the given stage arguments, or
    None when one process is all there is to run (one GPU or none, or already launched)."""
    if num_gpus <= 1 or in_launched_process():
        return None
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", f"--num_processes={num_gpus}", "--num_machines=1",
        f"--mixed_precision={ACCELERATE_PRECISION[precision]}", "--dynamo_backend=no",
        "-m", "selfperceptual", *argv,
    ]
