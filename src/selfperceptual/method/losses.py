"""The objectives' losses as small callables (their plug-ins, objectives/, build them): ``loss(denoiser, x0, context, ...) -> (per_sample, logs)``.

The caller may pass the randomness (eps, t, t') so tests can pin it and the training loop can draw
it per sample (``draw``); otherwise it is drawn here.
``MSELoss`` is Eq. 4; ``SelfPerceptualLoss`` is Eq. 5-11 and Algorithm 1 (and Eq. 13-16 for sp2);
``LatentPerceptualLoss`` (LPL, Berrada et al. 2025) and ``CascadeLoss`` (Cas-DM, arXiv 2401.02414)
are peer objectives, for comparison.
"""

from __future__ import annotations

import torch

from .schedule import Schedule
from .unet import PerceptualNetwork, compiled


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


DISTANCES = {
    "mse": lambda a, b: _mean_per_sample((a - b) ** 2),
    "mae": lambda a, b: _mean_per_sample((a - b).abs()),
}


def _clamp_timesteps(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    return t.round().long().clamp(0, num_train_timesteps - 1)


# Table 3: how t' is drawn. The paper clamps to [1, T]; in 0-based diffusers indices that is
# [0, T-1]. "t +/- 40" is read as t' = t - 40 or t + 40 with equal probability, and N(t, 100) as a
# normal with standard deviation 100 (the paper states neither rule exactly).
T_PRIME_SAMPLERS = {
    "uniform": lambda t, T, g: torch.randint(0, T, t.shape, generator=g, device=t.device),
    "near40": lambda t, T, g: _clamp_timesteps(
        t + 40 * (2 * torch.randint(0, 2, t.shape, generator=g, device=t.device) - 1), T
    ),
    "normal100": lambda t, T, g: _clamp_timesteps(
        t + 100.0 * torch.randn(t.shape, generator=g, device=t.device), T
    ),
}


def _per_sample(generators, draw) -> torch.Tensor:
    return torch.stack([draw(generator) for generator in generators])


def _generators(generators, generator, count: int) -> list:
    return generators if generators is not None else [generator] * count


def draw_noise(schedule: Schedule, x0: torch.Tensor, generators: list) -> dict[str, torch.Tensor]:
    """eps and t for each sample of x0, each from its own generator (Algorithm 1 l. 18-19)."""
    return {
        "eps": _per_sample(generators, lambda g: torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype)).to(x0.device),
        "t": _per_sample(generators, lambda g: schedule.sample_timesteps(1, g)[0]).to(x0.device),
    }


class MSELoss:
    """Eq. 4: || v_hat - v ||^2 per sample."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def draw(self, x0: torch.Tensor, generators: list) -> dict[str, torch.Tensor]:
        return draw_noise(self.schedule, x0, generators)

    def to(self, device, memory_format: torch.memory_format = torch.preserve_format) -> MSELoss:
        """Moves the loss's own networks (none for MSE) to ``device`` in ``memory_format``."""
        return self

    def compile(self) -> MSELoss:
        """Compiles the loss's own networks where it pays (torch.compile; train.compile)."""
        return self

    def noised(self, x0, eps=None, t=None, generator=None, generators=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, t, x_t): the given or drawn noise and timesteps, and x0 noised with them (Eq. 5)."""
        if eps is None or t is None:
            drawn = self.draw(x0, _generators(generators, generator, len(x0)))
            eps, t = drawn["eps"] if eps is None else eps, drawn["t"] if t is None else t
        return eps, t, self.schedule.add_noise(x0, eps, t)

    def v_distance(self, v_hat, x0, eps, t) -> torch.Tensor:
        return DISTANCES["mse"](v_hat.float(), self.schedule.v_target(x0, eps, t).float())

    def v_error(self, denoiser, x0, context, **randomness):
        """Eq. 4 per sample, with what it computed on the way: (per_sample, x_t, v_hat, t)."""
        eps, t, x_t = self.noised(x0, **randomness)
        v_hat = denoiser(x_t, t, context)
        return self.v_distance(v_hat, x0, eps, t), x_t, v_hat, t

    def __call__(self, denoiser, x0, context, **randomness):
        per_sample, _, _, t = self.v_error(denoiser, x0, context, **randomness)
        return per_sample, {"t": t}


class SelfPerceptualLoss:
    """Eq. 11: || f*_l(x_hat_t', t', c) - f*_l(x_t', t', c) ||^2 with f*_l frozen.

    ``formulation="sp2"`` is Eq. 13-16: x0_hat and eps_hat are each re-noised with the other's
    ground truth, and the two feature distances are summed.
    """

    def __init__(self, schedule: Schedule, perceptual: PerceptualNetwork, distance="mse", t_prime="uniform", formulation="sp"):
        if distance not in DISTANCES or t_prime not in T_PRIME_SAMPLERS or formulation not in ("sp", "sp2"):
            raise ValueError(f"unknown SP variant: distance={distance!r} t_prime={t_prime!r} formulation={formulation!r}")
        self.schedule = schedule
        self.perceptual = perceptual
        self.distance = DISTANCES[distance]
        self.t_prime_sampler = T_PRIME_SAMPLERS[t_prime]
        self.formulation = formulation

    def draw(self, x0: torch.Tensor, generators: list) -> dict[str, torch.Tensor]:
        """eps, t and t' for each sample, each from its own generator (Algorithm 1 l. 18-19, 32)."""
        drawn = draw_noise(self.schedule, x0, generators)
        t_cpu = drawn["t"].cpu()
        t_prime = [self.t_prime_sampler(t_cpu[i : i + 1], self.schedule.num_train_timesteps, g)[0] for i, g in enumerate(generators)]
        return {**drawn, "t_prime": torch.stack(t_prime).to(x0.device)}

    def to(self, device, memory_format: torch.memory_format = torch.preserve_format) -> SelfPerceptualLoss:
        self.perceptual.to(device, memory_format=memory_format)
        return self

    def compile(self) -> SelfPerceptualLoss:
        """f*'s forward is as much of the step as the UNet's: compiled like it."""
        self.perceptual.features = compiled(self.perceptual.features)
        return self

    def _feature_distance(self, x_pred, x_real_features, t_prime, context):
        pred_features = self.perceptual.features(x_pred, t_prime, context)
        return sum(self.distance(p.float(), r.float()) for p, r in zip(pred_features, x_real_features))

    def __call__(self, denoiser, x0, context, eps=None, t=None, t_prime=None, generator=None, generators=None):
        schedule = self.schedule
        if eps is None or t is None or t_prime is None:
            drawn = self.draw(x0, _generators(generators, generator, len(x0)))
            eps, t = drawn["eps"] if eps is None else eps, drawn["t"] if t is None else t
            t_prime = drawn["t_prime"] if t_prime is None else t_prime
        # Eq. 5-8: predict v at t and convert it to x0_hat and eps_hat.
        x_t = schedule.add_noise(x0, eps, t)
        v_hat = denoiser(x_t, t, context)
        x0_hat = schedule.x0_from_v(x_t, v_hat, t)
        eps_hat = schedule.eps_from_v(x_t, v_hat, t)
        # t' was drawn anew, independently of t for the paper's rule (Algorithm 1 l. 32; Table 3
        # for the other rules). Eq. 9: the real branch needs no graph.
        with torch.no_grad():
            real_features = self.perceptual.features(schedule.add_noise(x0, eps, t_prime), t_prime, context)
        if self.formulation == "sp":
            # Eq. 10: re-noise the prediction with the *predicted* noise eps_hat.
            per_sample = self._feature_distance(schedule.add_noise(x0_hat, eps_hat, t_prime), real_features, t_prime, context)
        else:
            # Eq. 14-16: x0_hat with the true eps, and the true x0 with eps_hat.
            per_sample = self._feature_distance(schedule.add_noise(x0_hat, eps, t_prime), real_features, t_prime, context)
            per_sample = per_sample + self._feature_distance(
                schedule.add_noise(x0, eps_hat, t_prime), real_features, t_prime, context
            )
        return per_sample, {"t": t, "t_prime": t_prime}


def _outlier_mask(features: torch.Tensor, down: int, quantile: float = 0.02) -> torch.Tensor:
    """Berrada et al.'s outlier masking of a target feature map (B, C, H, W): per channel, keep the
    values within two standard deviations beyond the 2% and 98% quantiles; then dilate the mask of
    kept values by ceil(3 / down), which keeps an isolated outlier, and erode it by ceil(5 / down),
    which masks a cluster of outliers with a margin. ``down`` is the image's size over the map's;
    an even kernel is made odd as theirs is (3 for opening, 1 for closing)."""
    closing, opening = -(-3 // down), -(-5 // down)
    closing, opening = 1 if closing == 2 else closing, 3 if opening == 2 else opening
    flat = features.flatten(2)
    n = flat.shape[-1]
    low = flat.kthvalue(max(int(n * quantile), 1), dim=-1).values[..., None, None]
    high = flat.kthvalue(max(int(n * (1 - quantile)), 1), dim=-1).values[..., None, None]
    spread = 2 * flat.std(-1)[..., None, None]
    mask = ((low - spread < features) & (features < high + spread)).float()
    mask = torch.nn.functional.max_pool2d(mask, closing, stride=1, padding=(closing - 1) // 2)
    return -torch.nn.functional.max_pool2d(-mask, opening, stride=1, padding=(opening - 1) // 2)


class LatentPerceptualLoss(MSELoss):
    """LPL (Berrada et al. 2025, "Boosting Latent Diffusion with Perceptual Objectives"): Eq. 4's
    v error plus ``weight`` times a distance between the frozen VAE decoder's features of x0_hat and
    of x0, averaged over the samples with t < ``t_threshold`` (high SNR, where x0_hat is sharp
    enough), as the reference's ``loss + lpl_weight * lpl[t < threshold].mean()`` does.

    Features: the decoder's mid block and its first ``num_blocks`` up blocks, on the path
    ``vae.decode`` takes (post_quant_conv, then the decoder). Per feature map: outliers of the target
    masked where the map is at least half the image's size (``_outlier_mask``), both maps divided by
    the target's norm over channels at each position ("shared" normalisation), the squared
    difference averaged over the kept positions and the channels, weighted 2^-min(i, 3) for the
    i-th map (``power_law``), and the maps averaged. Gradients reach the UNet through x0_hat only.
    """

    def __init__(self, schedule: Schedule, vae, weight: float = 1.0, t_threshold: int = 200, num_blocks: int | None = None,
                 power_law: bool = True, remove_outliers: bool = True):  # fmt: skip
        super().__init__(schedule)
        self.weight, self.t_threshold = weight, t_threshold
        self.vae = vae.requires_grad_(False).eval()
        blocks = len(vae.decoder.up_blocks)
        self.num_blocks = blocks if num_blocks is None else num_blocks
        if not 0 <= self.num_blocks <= blocks:
            raise ValueError(f"num_blocks={num_blocks}: the decoder has {blocks} up blocks")
        self.power_law, self.remove_outliers = power_law, remove_outliers

    def to(self, device, memory_format: torch.memory_format = torch.preserve_format) -> LatentPerceptualLoss:
        self.vae.to(device, memory_format=memory_format)
        return self

    def features(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's feature maps of (scaled) latents, in the order it computes them."""
        decoder = self.vae.decoder
        h = decoder.conv_in(self.vae.post_quant_conv(latents / self.vae.config.scaling_factor))
        h = decoder.mid_block(h, None)
        found = [h]
        for block in decoder.up_blocks[: self.num_blocks]:
            h = block(h, None)
            found.append(h)
        return found

    def perceptual(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The LPL term per sample."""
        with torch.no_grad():
            targets = self.features(x0)
        image_size = x0.shape[-1] * 2 ** (len(self.vae.decoder.up_blocks) - 1)
        total = 0.0
        for i, (x, y) in enumerate(zip(self.features(x0_hat), targets)):
            x, y = x.float(), y.float()
            down = image_size // y.shape[-1]
            mask = _outlier_mask(y, down) if self.remove_outliers and down <= 2 else torch.ones_like(y)
            y = y * mask
            norm = y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-6
            squared = ((x - y) / norm) ** 2 * mask
            per_channel = squared.sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
            total = total + per_channel.mean(1) * (2.0 ** -min(i, 3) if self.power_law else 1.0)
        return total / (self.num_blocks + 1)

    def __call__(self, denoiser, x0, context, **randomness):
        """Per sample, so that the batch mean is the reference's ``v_error.mean() + weight *
        lpl[t < t_threshold].mean()``: each below-threshold sample's term is scaled by the batch
        size over the number below the threshold. The batch is the micro-batch the trainer passes
        (the reference's per-device batch); with none below the threshold there is no term."""
        per_sample, x_t, v_hat, t = self.v_error(denoiser, x0, context, **randomness)
        low_noise = t < self.t_threshold
        below = int(low_noise.sum())
        if below:
            x0_hat = self.schedule.x0_from_v(x_t[low_noise], v_hat[low_noise], t[low_noise])
            extra = torch.zeros_like(per_sample)
            extra[low_noise] = self.perceptual(x0_hat, x0[low_noise]) * (len(t) / below)
            per_sample = per_sample + self.weight * extra
        return per_sample, {"t": t}


class CascadeLoss(MSELoss):
    """Cas-DM's objective on a ``casdm.CascadedUNet``: module one's v error (Eq. 4, unchanged), plus
    ``x0_weight`` times module two's squared error on x0, plus ``metric_weight`` times LPIPS (``metric``)
    of module two's x0 and the real x0, both decoded by the frozen VAE; with ``metric_weighting``
    "alpha_bar" each sample's LPIPS is weighted by alpha_bar_t, the signal's share of x_t, so the
    metric acts where x_t still holds the image (our reading of the paper's dynamic weight). Module
    two's input x0_hat carries no gradient, so module one never sees the metric."""

    def __init__(self, schedule: Schedule, vae, metric, x0_weight: float = 1.0, metric_weight: float = 1.0, metric_weighting: str = "alpha_bar"):
        super().__init__(schedule)
        if metric_weighting not in ("alpha_bar", "constant"):
            raise ValueError(f"unknown metric_weighting {metric_weighting!r}; choose alpha_bar or constant")
        self.vae, self.metric = vae.requires_grad_(False).eval(), metric.requires_grad_(False).eval()
        self.x0_weight, self.metric_weight, self.metric_weighting = x0_weight, metric_weight, metric_weighting

    def to(self, device, memory_format: torch.memory_format = torch.preserve_format) -> CascadeLoss:
        self.vae.to(device, memory_format=memory_format)
        self.metric.to(device, memory_format=memory_format)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    def __call__(self, cascade, x0, context, **randomness):
        eps, t, x_t = self.noised(x0, **randomness)
        v_hat, x0_refined = cascade(x_t, t, context)
        v_error = self.v_distance(v_hat, x0, eps, t)
        x0_error = DISTANCES["mse"](x0_refined.float(), x0.float())
        per_sample = v_error + self.x0_weight * x0_error
        logs = {"t": t}
        if self.metric_weight > 0:
            with torch.no_grad():
                real = self.decode(x0)
            metric = self.metric(self.decode(x0_refined), real).float()
            if self.metric_weighting == "alpha_bar":
                metric = metric * self.schedule.alpha_bar.to(metric.device)[t.long()].float()
            per_sample = per_sample + self.metric_weight * metric
        return per_sample, logs
