"""The one adapter around diffusers' UNet2DConditionModel, and the frozen perceptual network.

``Denoiser`` maps (x_t, t, text context) to v_hat. ``PerceptualNetwork`` is the frozen copy f*_l
of Section 3.2: it keeps only the submodules that layer l needs (for the mid-block feature:
conv_in, the time embedding, the down blocks and the mid block) and returns hidden features.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import nn

# Which hidden features each layer choice of Table 2 returns.
LAYERS = {
    "midblock": ("mid",),
    "encoder": ("down",),
    "decoder": ("up",),
    "encoder_midblock": ("down", "mid"),
}
_ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks")

# torch.compile's backend for train.compile: Inductor, which generates the fused GPU kernels. The CPU
# test of compiled against eager training sets "aot_eager" (the same graph capture and autograd
# graphs, no code generation, which takes minutes on a CPU for even the smallest UNet).
COMPILE_BACKEND = "inductor"


def finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one host sync)."""
    found = [p.detach().isfinite().all() for p in model.parameters()]
    return not found or bool(torch.stack(found).all())


def compiled(function):
    """``function`` (a network's forward) under torch.compile with ``COMPILE_BACKEND``."""
    return torch.compile(function, backend=COMPILE_BACKEND)


def _architecture(config) -> dict:
    """A UNet config without the bookkeeping keys (source path, diffusers version)."""
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in dict(config).items() if not key.startswith("_")}


class Denoiser(nn.Module):
    """v_hat = f_theta(x_t, t, c) (Eq. 3)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]


class PerceptualNetwork(nn.Module):
    """f*_l: the parts of a UNet that layer l needs, returning its features.

    The constructor shares the UNet's modules (for inspection); ``frozen_copy`` and ``load`` give
    the frozen network that training uses. The freeze stage saves the whole frozen UNet, so every
    layer choice of Table 2 can be loaded from it.
    """

    def __init__(self, unet: UNet2DConditionModel, layer: str):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown perceptual layer {layer!r}; choose one of {', '.join(LAYERS)}")
        self.layer = layer
        self.config = dict(unet.config)
        wanted = LAYERS[layer]
        for name in _ENCODER_PARTS:
            setattr(self, name, getattr(unet, name))
        self.mid_block = unet.mid_block if {"mid", "up"} & set(wanted) else None
        self.up_blocks = unet.up_blocks if "up" in wanted else None

    @classmethod
    def frozen_copy(cls, unet: UNet2DConditionModel, layer: str) -> PerceptualNetwork:
        """Algorithm 1 l. 9-11: deep-copies only the parts ``layer`` needs, then freezes them."""
        return copy.deepcopy(cls(unet, layer)).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PerceptualNetwork:
        return super().train(False)  # always eval: frozen means no dropout or norm updates either

    def features(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """The hidden features of layer l, in the order the UNet computes them (UNet2DConditionModel.forward, cut short)."""
        wanted = LAYERS[self.layer]
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(x_t)
        skips, found = [h], []
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
            if "down" in wanted:
                found.append(h)
        if self.mid_block is None:
            return found
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        if "mid" in wanted:
            found.append(h)
        for block in self.up_blocks or ():
            res, skips = tuple(skips[-len(block.resnets) :]), skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb, encoder_hidden_states=context)
            else:
                h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb)
            found.append(h)
        return found

    def mismatch(self, unet: UNet2DConditionModel) -> str | None:
        """Why this network is not a frozen copy of ``unet`` (another architecture, or other
        weights), or None when it is one."""
        mine, theirs = _architecture(self.config), _architecture(unet.config)
        if mine != theirs:
            differing = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
            return "another architecture (" + ", ".join(f"{key}: {mine.get(key)} vs {theirs.get(key)}" for key in differing[:4]) + ")"
        reference = unet.state_dict()
        differ = [key for key, value in self.state_dict().items() if not torch.equal(value.cpu(), reference[key].cpu())]
        if differ:
            return f"other weights ({len(differ)} of {len(reference)} tensors differ, e.g. {differ[0]})"
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def load(cls, unet_dir: str | Path, layer: str) -> PerceptualNetwork:
        """f*_l from a saved UNet folder (the freeze stage's): reads only the tensors ``layer`` needs."""
        unet_dir = Path(unet_dir)
        with torch.device("meta"):  # the parts layer l does not need are never allocated
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
        network = cls(unet, layer)
        wanted, state = set(network.state_dict()), {}
        for path in sorted(unet_dir.glob("*.safetensors")):  # one file, or the shards of a large model
            with safe_open(path, framework="pt") as tensors:
                state.update({key: tensors.get_tensor(key) for key in tensors.keys() if key in wanted})  # noqa: SIM118 - safe_open has no __iter__
        network.load_state_dict(state, strict=True, assign=True)
        return network.requires_grad_(False).eval()
