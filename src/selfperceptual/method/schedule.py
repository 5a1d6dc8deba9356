"""The noise schedule: the one owner of alpha_bar and of every noise-level conversion.

Stable Diffusion's scaled-linear betas, rescaled to zero terminal SNR (Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1), so alpha_bar[T-1] == 0 and
the model must predict v. No conversion below divides, so everything is finite at t = T-1.
"""

from __future__ import annotations

import torch


def zero_terminal_snr_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """Scaled-linear betas rescaled so the last step has SNR exactly 0 (computed in float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    # Shift so the last value is 0, then scale so the first keeps its value.
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class Schedule:
    """alpha_bar over integer timesteps 0..T-1 and the v-parameterisation (paper Eq. 2, 7, 8)."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)  # last beta is 1: alpha_bar[-1] == 0
        self.num_train_timesteps = len(betas)
        self._alpha_bar_on: dict[torch.device, torch.Tensor] = {}  # copies on the devices in use

    @classmethod
    def zero_snr(cls, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000) -> Schedule:
        return cls(zero_terminal_snr_betas(beta_start, beta_end, num_train_timesteps))

    @classmethod
    def from_config(cls, config) -> Schedule:
        return cls.zero_snr(config.beta_start, config.beta_end, config.num_train_timesteps)

    def scheduler_config(self) -> dict:
        """The DDIM settings every sampler of this project uses (diffusers keyword arguments)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "set_alpha_to_one": True,
            "clip_sample": False,
            "steps_offset": 1,  # unused by trailing spacing; StableDiffusionPipeline rewrites any other value
        }

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """t ~ U{0, ..., T-1} (Algorithm 1 line 18)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.device not in self._alpha_bar_on:
            self._alpha_bar_on[like.device] = self.alpha_bar.to(like.device)
        alpha_bar = self._alpha_bar_on[like.device][t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        signal = alpha_bar.sqrt().to(like.dtype).reshape(shape)
        noise = (1.0 - alpha_bar).sqrt().to(like.dtype).reshape(shape)
        return signal, noise

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 5: x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
        signal, noise = self._coefficients(t, x0)
        return signal * x0 + noise * eps

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 2: v = sqrt(ab) eps - sqrt(1-ab) x0."""
        signal, noise = self._coefficients(t, x0)
        return signal * eps - noise * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 7: x0_hat = sqrt(ab) x_t - sqrt(1-ab) v_hat."""
        signal, noise = self._coefficients(t, x_t)
        return signal * x_t - noise * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 8: eps_hat = sqrt(ab) v_hat + sqrt(1-ab) x_t."""
        signal, noise = self._coefficients(t, x_t)
        return signal * v + noise * x_t

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alpha_bar[t.long()]
        return alpha_bar / (1.0 - alpha_bar)
