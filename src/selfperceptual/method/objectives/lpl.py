"""LPL (Berrada et al. 2025, "Boosting Latent Diffusion with Perceptual Objectives"), a peer of SP:
the MSE loss plus the distance of the frozen VAE decoder's features of x0_hat and x0 at low noise
(losses.LatentPerceptualLoss)."""

from __future__ import annotations

from pydantic import Field

from .base import Objective, ObjectiveSettings, register


class LatentPerceptualSettings(ObjectiveSettings):
    """Defaults: the values diffusers' examples/research_projects/lpl recommends."""

    weight: float = Field(1.0, ge=0)
    t_threshold: int = Field(200, ge=0)
    num_blocks: int | None = Field(None, ge=0)  # decoder up blocks whose features count (null: all; SD's VAE has 4)
    power_law: bool = True  # the i-th feature map weighted 2^-min(i, 3)
    remove_outliers: bool = True


@register
class LatentPerceptual(Objective):
    name, label = "lpl", "LPL"
    summary = ("the MSE loss plus weight times the VAE decoder's feature distance, averaged over the samples below t_threshold "
               "(Berrada et al. 2025; weighted as diffusers' research project weighs it).")
    settings = LatentPerceptualSettings

    def loss(self, settings, schedule, pipeline, inputs):
        from ..losses import LatentPerceptualLoss

        return LatentPerceptualLoss(schedule, pipeline.vae, settings.weight, settings.t_threshold, settings.num_blocks,
                                    settings.power_law, settings.remove_outliers)  # fmt: skip

    def flops_per_image(self, counts, settings, num_train_timesteps):
        """The online UNet's step, plus the VAE decoder on both images (an upper bound: its features
        stop before the last layers) for the share of samples below the threshold."""
        found, low_noise = counts(), settings.t_threshold / num_train_timesteps
        return found["unet_train"] + low_noise * (found["vae_decode"] + found["decode_branch"])
