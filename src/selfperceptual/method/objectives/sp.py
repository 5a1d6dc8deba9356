"""SP, the paper's self-perceptual objective (Section 3.2, Eq. 5-11, Algorithm 1; sp2 is Eq. 13-16):
the distance of a frozen copy f*_l of the starting model's features of the re-noised prediction and
of the re-noised ground truth (losses.SelfPerceptualLoss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ..errors import InputError, ModelMismatch
from .base import Objective, ObjectiveSettings, register


class SelfPerceptualSettings(ObjectiveSettings):
    layer: Literal["midblock", "encoder", "decoder", "encoder_midblock"] = "midblock"  # Table 2 (unet.LAYERS)
    t_prime: Literal["uniform", "near40", "normal100"] = "uniform"  # Table 3 (losses.T_PRIME_SAMPLERS)
    distance: Literal["mse", "mae"] = "mse"  # Table 4
    formulation: Literal["sp", "sp2"] = "sp"  # Table 5


def frozen_source(folder: Path) -> str:
    """The model a frozen network was copied from, as its folder's summary.json records it."""
    summary = folder / "summary.json"
    return json.loads(summary.read_text())["source"] if summary.is_file() else "an unknown model"


def load_perceptual(folder: Path | None, layer: str, unet):
    """f*_l from a freeze stage's folder (its ``network/``), checked to be a frozen copy of ``unet``,
    the model training starts from (Algorithm 1 l. 9-11)."""
    from ..unet import PerceptualNetwork

    if folder is None:
        raise InputError("perceptual", "SP needs the frozen perceptual network f* (a freeze stage's folder)")
    network_dir = folder / "network"
    if not (network_dir / "config.json").is_file() or not list(network_dir.glob("*.safetensors")):
        raise InputError("perceptual", "no frozen network (network/config.json and weights); run its freeze stage", folder)
    try:
        perceptual = PerceptualNetwork.load(network_dir, layer)
    except Exception as error:
        raise InputError("perceptual", f"cannot load the frozen network: {error}", folder) from error
    problem = perceptual.mismatch(unet)
    if problem:
        source = frozen_source(folder)
        raise ModelMismatch("perceptual", f"f* (frozen from {source}) is not a frozen copy of the model being trained: {problem}", folder)
    return perceptual


@register
class SelfPerceptual(Objective):
    name, label = "sp", "SP"
    summary = "the distance of a frozen copy of the starting model's features of the re-noised prediction and ground truth (the paper's)."
    settings = SelfPerceptualSettings
    inputs = {"perceptual": "a freeze stage's folder: f*, the frozen copy of the starting model"}

    def loss(self, settings, schedule, pipeline, inputs):
        from ..losses import SelfPerceptualLoss

        perceptual = load_perceptual(inputs.get("perceptual"), settings.layer, pipeline.unet)
        return SelfPerceptualLoss(schedule, perceptual, settings.distance, settings.t_prime, settings.formulation)

    def flops_per_image(self, counts, settings, num_train_timesteps):
        """The online UNet's forward and backward, f*_l on the real branch (no graph) and on the
        predicted branch (forward and input-gradient backward), Algorithm 1."""
        found = counts(settings.layer)
        return found["unet_train"] + found["frozen_forward"] + found["frozen_branch"]

    def tags(self, settings, inputs):
        source = Path(frozen_source(inputs["perceptual"])).name  # the model f* was frozen from
        return {"sp_layer": settings.layer, "sp_t_prime": settings.t_prime, "sp_distance": settings.distance,
                "sp_formulation": settings.formulation, "perceptual_network": source}  # fmt: skip
