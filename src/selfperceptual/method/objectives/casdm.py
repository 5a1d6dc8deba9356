"""Cas-DM (Zhang et al. 2024, "Bring Metric Functions into Diffusion Models", arXiv 2401.02414), a
peer of SP: module one keeps the MSE loss; module two predicts x0 from x_t and module one's x0
estimate, trained with LPIPS of the decoded images (cascade.py: the model and its pipeline;
losses.CascadeLoss). Its pipelines are CasDMPipelines, with module two as ``x0_unet``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Objective, ObjectiveSettings, register


class CasDMSettings(ObjectiveSettings):
    """The paper leaves the weights and the dynamic weighting open; docs/peers.md gives our choices."""

    x0_weight: float = Field(1.0, ge=0)
    metric_weight: float = Field(1.0, ge=0)
    metric_weighting: Literal["alpha_bar", "constant"] = "alpha_bar"  # LPIPS per sample times alpha_bar_t, or not
    metric: Literal["featnet", "vgg", "alex"] = "featnet"  # LPIPS's backbone: the evaluation network, or LPIPS's own
    metric_weights: str | None = None  # vgg/alex: torchvision's ImageNet weights file of that network
    metric_weights_sha256: str | None = None  # its published SHA-256 or leading hex digits (vgg16-397923af.pth: 397923af); null: unchecked

    @model_validator(mode="after")
    def _weights_named(self):
        if self.metric != "featnet" and not self.metric_weights:
            raise ValueError(f"metric {self.metric!r} needs metric_weights: the path of torchvision's {self.metric} weights file")
        return self


@register
class CasDM(Objective):
    name, label = "casdm", "Cas-DM"
    summary = ("module one keeps the MSE loss, module two predicts x0 with LPIPS on decoded images (arXiv 2401.02414); at the "
               "small scales LPIPS runs on the evaluation network itself, so Cas-DM is trained on the features FID measures.")
    settings = CasDMSettings
    inputs = {"metric": "the featnet stage's folder: LPIPS's backbone with metric featnet"}
    files = {"metric_weights": "torchvision's VGG16 ImageNet weights, https://download.pytorch.org/models/vgg16-397923af.pth "
                               "(AlexNet with metric alex: https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)"}
    pipeline_class = "CasDMPipeline"
    components = ("unet", "x0_unet")
    long_running = True  # two UNets, the decoder and LPIPS per step

    def needs(self, settings):
        return dict(self.inputs) if settings.metric == "featnet" else {}

    def default_sources(self, settings):
        return {"metric": "featnet"} if settings.metric == "featnet" else {}

    def files_in_use(self, settings):
        return {} if settings.metric == "featnet" else {"metric_weights": settings.metric_weights}

    def trained_model(self, pipeline, schedule):
        """Both modules: the pipeline's module two when it has one, else one made from its UNet."""
        from ..cascade import CascadedUNet, module_two

        x0_unet = getattr(pipeline, "x0_unet", None)
        return CascadedUNet(pipeline.unet, x0_unet if x0_unet is not None else module_two(pipeline.unet), schedule)

    def networks(self, model):
        return (model.unet, model.x0_unet)

    def denoiser(self, model):
        return model  # the cascade returns (v_hat, x0) itself

    def loss(self, settings, schedule, pipeline, inputs):
        from ..cascade import build_metric
        from ..losses import CascadeLoss

        metric = build_metric(settings.metric, settings.metric_weights, inputs.get("metric"), settings.metric_weights_sha256)
        return CascadeLoss(schedule, pipeline.vae, metric, settings.x0_weight, settings.metric_weight, settings.metric_weighting)

    def pipeline(self, model, **components):
        from ..cascade import CasDMPipeline

        return CasDMPipeline(unet=model.unet, x0_unet=model.x0_unet, safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False, **components)  # fmt: skip

    def pipeline_type(self):
        from ..cascade import CasDMPipeline

        return CasDMPipeline

    def save(self, model, folder):
        from ..cascade import mark_cascade

        model.unet.save_pretrained(folder / "unet", safe_serialization=True)
        model.x0_unet.save_pretrained(folder / "x0_unet", safe_serialization=True)
        mark_cascade(folder)

    def flops_per_image(self, counts, settings, num_train_timesteps):
        """Two UNets' steps, the decoder on both images and LPIPS's VGG16 on both."""
        found = counts()
        return 2 * found["unet_train"] + found["vae_decode"] + found["decode_branch"] + found["vgg_forward"] + found["vgg_branch"]
