"""Properties of the zero-terminal-SNR schedule and its conversions."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from selfperceptual.method.schedule import Schedule

PAPER_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_alphas_match_diffusers(scheduler_class):
    ours = Schedule.zero_snr().alpha_bar
    theirs = scheduler_class(**PAPER_BETAS).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)


def test_terminal_snr_is_exactly_zero_and_snr_decreases():
    schedule = Schedule.zero_snr()
    assert schedule.alpha_bar[-1].item() == 0.0
    snr = schedule.snr(torch.arange(1000))
    assert snr[-1].item() == 0.0
    assert (snr[1:] < snr[:-1]).all()


@pytest.mark.parametrize("step", [0, 500, 999])
def test_conversions_round_trip(step):
    schedule = Schedule.zero_snr()
    generator = torch.Generator().manual_seed(step)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.full((3,), step)
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.v_target(x0, eps, t)
    assert torch.isfinite(x_t).all() and torch.isfinite(v).all()
    assert torch.allclose(schedule.x0_from_v(x_t, v, t), x0, atol=1e-10)
    assert torch.allclose(schedule.eps_from_v(x_t, v, t), eps, atol=1e-10)


def test_terminal_step_is_pure_noise():
    schedule = Schedule.zero_snr()
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.full((2,), 999)
    assert torch.equal(schedule.add_noise(x0, eps, t), eps)
    assert torch.equal(schedule.v_target(x0, eps, t), -x0)  # v = -x0 when alpha_bar = 0


def test_scheduler_config_is_the_papers_sampler():
    config = Schedule.zero_snr().scheduler_config()
    assert config["prediction_type"] == "v_prediction"
    assert config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    assert config["set_alpha_to_one"] is True
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config)
    scheduler.set_timesteps(25)
    assert scheduler.timesteps[0].item() == 999  # sampling starts at t = T
