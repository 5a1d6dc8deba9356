"""Cas-DM's model (Zhang et al. 2024, "Bring Metric Functions into Diffusion Models", arXiv 2401.02414), a peer
of SP: two cascaded modules. Module one is the usual denoiser (here our v-predicting UNet, trained
with the MSE loss alone). Module two takes x_t, t and module one's x0 estimate, with the gradient
stopped between them, and predicts x0; only it sees the metric loss (LPIPS of the decoded images).
Sampling is DDIM with module two's x0 and module one's noise estimate.

Our choices where the paper is open (docs/peers.md): module two has module one's architecture with
twice the input channels (x_t and x0_hat side by side) and starts from module one's weights, the new
input channels and the output layer zero, and it predicts a correction added to x0_hat, so at the
first step the cascade samples exactly as the MSE model it starts from. The text condition reaches
both modules; under CFG, module two gets the guided x0 estimate and the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import lpips
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from .errors import InputError
from .weights import read_weights
from .featnet import TinyFeatureNet
from .schedule import Schedule


def module_two(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Module two made from module one: the same architecture taking [x_t, x0_hat], module one's
    weights, zero weights on the x0_hat channels and a zero output layer (so it adds nothing at first)."""
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    two = UNet2DConditionModel.from_config({**config, "in_channels": 2 * unet.config.in_channels})
    state = {key: value.detach().clone() for key, value in unet.state_dict().items()}
    state["conv_in.weight"] = torch.cat([state["conv_in.weight"], torch.zeros_like(state["conv_in.weight"])], dim=1)
    state["conv_out.weight"].zero_()
    state["conv_out.bias"].zero_()
    two.load_state_dict(state)
    return two


def refine(x0_unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Module two: x0 from x_t and module one's estimate x0_hat (a correction added to it)."""
    correction = x0_unet(torch.cat([x_t, x0_hat], dim=1), t, encoder_hidden_states=context, return_dict=False)[0]
    return x0_hat + correction


class CascadedUNet(nn.Module):
    """Both modules as one trainable model: ``forward`` returns module one's v_hat and module two's
    x0 (one call, so data-parallel training sees every parameter's gradient)."""

    def __init__(self, unet: UNet2DConditionModel, x0_unet: UNet2DConditionModel, schedule: Schedule):
        super().__init__()
        self.unet, self.x0_unet, self.schedule = unet, x0_unet, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_hat = self.unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
        x0_hat = self.schedule.x0_from_v(x_t, v_hat.detach(), t)  # the gradient stops between the modules
        return v_hat, refine(self.x0_unet, x_t, t, context, x0_hat)


class CasDMPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline with module two (``x0_unet``): ``CasDMPipeline.from_pretrained(folder)``.
    Deterministic DDIM (``eta`` 0) or DDIM with noise, CFG and its rescale, as the parent's call takes them."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, x0_unet, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False):  # fmt: skip
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder, requires_safety_checker)
        self.register_modules(x0_unet=x0_unet)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 50, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 eta: float = 0.0, generator=None, output_type: str = "pil", return_dict: bool = True):  # fmt: skip
        device, guided = self._execution_device, guidance_scale > 1.0
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text, unconditional = self.encode_prompt(prompts, device, 1, guided)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        side = self.unet.config.sample_size * self.vae_scale_factor
        latents = self.prepare_latents(len(prompts), self.unet.config.in_channels, side, side, text.dtype, device, generator)
        step_options = self.prepare_extra_step_kwargs(generator, eta)
        alpha_bar = self.scheduler.alphas_cumprod.to(device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input, context = (torch.cat([latents] * 2), torch.cat([unconditional, text])) if guided else (latents, text)
            v = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                v_unconditional, v_text = v.chunk(2)
                v = v_unconditional + guidance_scale * (v_text - v_unconditional)
                if guidance_rescale > 0:
                    v = rescale_noise_cfg(v, v_text, guidance_rescale=guidance_rescale)
            signal, noise = alpha_bar[t].sqrt().to(latents.dtype), (1 - alpha_bar[t]).sqrt().to(latents.dtype)
            x0 = refine(self.x0_unet, latents, t, text, signal * latents - noise * v)
            eps = signal * v + noise * latents
            # The scheduler's v-prediction step, given this v and x_t, computes exactly x0 and eps
            # (x0 = signal x_t - noise v, eps = signal v + noise x_t), so its DDIM update is Cas-DM's.
            latents = self.scheduler.step(signal * eps - noise * x0, t, signal * x0 + noise * eps, **step_options, return_dict=False)[0]
        image = latents if output_type == "latent" else self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if output_type != "latent":
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None) if return_dict else (image, None)


def mark_cascade(pipeline_dir: Path) -> None:
    """Makes a saved pipeline folder with an ``x0_unet/`` a CasDMPipeline's (its model_index.json)."""
    index_file = pipeline_dir / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({"_class_name": CasDMPipeline.__name__, "x0_unet": ["diffusers", "UNet2DConditionModel"]})
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class FeatnetLPIPS(nn.Module):
    """LPIPS's distance over the evaluation network's conv stages (the small scales, where no VGG
    weights exist): per stage, features unit-normalised over channels, the squared difference summed
    over channels and averaged over positions, summed over stages; lpips.LPIPS(lpips=False)'s
    arithmetic, with lpips' own helpers."""

    def __init__(self, featnet: nn.Module):
        super().__init__()
        layers = list(featnet.body)
        ends = [i + 1 for i, layer in enumerate(layers) if isinstance(layer, nn.SiLU) and not isinstance(layers[i - 1], nn.Linear)]
        self.stages = nn.ModuleList(nn.Sequential(*layers[start:end]) for start, end in zip([0, *ends[:-1]], ends, strict=True))
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for stage in self.stages:
            images, target = stage(images), stage(target)
            difference = (lpips.normalize_tensor(images) - lpips.normalize_tensor(target)) ** 2
            total = total + lpips.spatial_average(difference.sum(dim=1, keepdim=True)).flatten()
        return total


class BackboneLPIPS(nn.Module):
    """lpips.LPIPS with a VGG or AlexNet backbone whose weights are read from a local torchvision
    file (no download); its learned linear layers ship inside the lpips package."""

    def __init__(self, kind: str, weights: str | Path, sha256: str | None = None):
        super().__init__()
        found = read_weights(weights, "metric_weights", sha256)  # torchvision's ImageNet weights, read without running code
        self.lpips = lpips.LPIPS(net=kind, pretrained=True, pnet_rand=True, verbose=False)  # its linear layers: torch.load, weights only since torch 2.6
        state = {}
        for name in self.lpips.net.state_dict():  # "slice2.5.weight": torchvision's "features.5.weight"
            _, index, kind_of = name.split(".")
            state[name] = found[f"features.{index}.{kind_of}"]
        self.lpips.net.load_state_dict(state)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(images, target).flatten()


def build_metric(metric: str, weights: str | None, featnet_dir: Path | None, sha256: str | None = None) -> nn.Module:
    """LPIPS with the backbone ``metric`` names: the featnet stage's network (its folder), or VGG/AlexNet
    from a file (checked against ``sha256``, its published hash, when given)."""
    if metric != "featnet":
        return BackboneLPIPS(metric, weights, sha256)
    if featnet_dir is None or not (featnet_dir / "featnet.json").is_file():
        raise InputError("metric", "no featnet.json; metric featnet needs a featnet stage's folder with the tiny network", featnet_dir)
    return FeatnetLPIPS(TinyFeatureNet.load(featnet_dir))
