"""Where and in what precision a stage runs its models: the one place that decides.

Every stage that runs a model asks ``runtime(precision)`` for its device (the GPU when one is
visible, else the CPU) and dtype (the ``precision`` params.yaml names for the stage), and puts
its models there with ``Runtime.place``. Training is the exception that proves the rule: its
forward and backward passes run under accelerate's autocast in ``train.precision`` while the
weights, the optimizer state and the EMA stay fp32 (mixed precision with fp32 master weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` on this device and dtype, in eval mode, with PyTorch's scaled-dot-product
        attention in every diffusers attention layer (transformers' CLIP uses SDPA by default)."""
        if hasattr(module, "set_attn_processor"):
            from diffusers.models.attention_processor import AttnProcessor2_0

            module.set_attn_processor(AttnProcessor2_0())
        if next(module.parameters()).dtype != self.dtype:  # diffusers warns on any .to(dtype), even a no-op
            module.to(dtype=self.dtype)
        return module.to(self.device).eval()

    def place_pipeline(self, pipeline):
        """Every model of a diffusers pipeline on this device and dtype (``place`` for each, an
        objective's own components such as Cas-DM's module two included)."""
        for component in pipeline.components.values():
            if isinstance(component, nn.Module):
                self.place(component)
        return pipeline

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.device, self.dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name} ({str(self.dtype).removeprefix('torch.')})"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def runtime(precision: str) -> Runtime:
    """The device a stage runs on and the dtype of its models (``fp32``, ``fp16`` or ``bf16``)."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    return Runtime(default_device(), DTYPES[precision])


def peak_memory_mib() -> float:
    """This process's peak memory so far: allocated on the GPU when there is one, else the CPU's max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
