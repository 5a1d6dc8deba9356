"""The one adapter around diffusers' UNet2DConditionModel, and the frozen perceptual network.

``Denoiser`` maps (x_t, t, text context) to v_hat. ``PerceptualNetwork`` is the frozen copy f*_l
of Section 3.2: it keeps only the submodules that layer l needs (for the mid-block feature:
conv_in, the time embedding, the down blocks and the mid block) and returns hidden features.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_dir

# Which hidden features each layer choice of Table 2 returns.
LAYERS = {
    "midblock": ("mid",),
    "encoder": ("down",),
    "decoder": ("up",),
    "encoder_midblock": ("down", "mid"),
}
_ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks")


class Denoiser(nn.Module):
    """v_hat = f_theta(x_t, t, c) (Eq. 3)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]


def _needs_up_blocks(layer: str) -> bool:
    return "up" in LAYERS[layer]


class PerceptualNetwork(nn.Module):
    """f*_l: the parts of a UNet that layer l needs, returning its features.

    The constructor shares the UNet's modules (for inspection); ``frozen_copy`` and ``load`` give
    the frozen network that training uses.
    """

    def __init__(self, unet: UNet2DConditionModel, layer: str):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown perceptual layer {layer!r}; choose one of {', '.join(LAYERS)}")
        self.layer = layer
        self.unet_config = dict(unet.config)
        for name in _ENCODER_PARTS:
            setattr(self, name, getattr(unet, name))
        self.mid_block = unet.mid_block
        self.up_blocks = unet.up_blocks if _needs_up_blocks(layer) else None

    @classmethod
    def frozen_copy(cls, unet: UNet2DConditionModel, layer: str) -> "PerceptualNetwork":
        """Algorithm 1 l. 9-11: deep-copies only the parts ``layer`` needs, then freezes them."""
        return copy.deepcopy(cls(unet, layer)).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PerceptualNetwork":
        return super().train(False)  # always eval: frozen means no dropout or norm updates either

    def features(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
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
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        if "mid" in wanted:
            found.append(h)
        if "up" in wanted:
            for block in self.up_blocks:
                res, skips = tuple(skips[-len(block.resnets) :]), skips[: -len(block.resnets)]
                if getattr(block, "has_cross_attention", False):
                    h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb, encoder_hidden_states=context)
                else:
                    h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb)
                found.append(h)
        return found

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path) -> None:
        with atomic_dir(directory) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "perceptual.safetensors")
            (tmp / "perceptual.json").write_text(json.dumps({"layer": self.layer, "unet_config": self.unet_config}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, layer: str | None = None) -> "PerceptualNetwork":
        """Loads a saved network; ``layer`` may ask for fewer parts than were saved."""
        directory = Path(directory)
        meta = json.loads((directory / "perceptual.json").read_text())
        layer = layer or meta["layer"]
        if _needs_up_blocks(layer) and not _needs_up_blocks(meta["layer"]):
            raise ValueError(f"{directory} holds no up blocks; layer {layer!r} needs them (freeze with that layer)")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(meta["unet_config"])
        network = cls(unet, layer)
        state = load_file(directory / "perceptual.safetensors")
        network.load_state_dict({k: v for k, v in state.items() if k in network.state_dict()}, assign=True)
        return network.requires_grad_(False).eval()
