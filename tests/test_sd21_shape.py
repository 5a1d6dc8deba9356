"""The paper's architecture: SD 2.1-base's UNet with random weights, on the CPU.

Builds the UNet from SD 2.1-base's configuration, reports how much of it the frozen mid-block
network f*_l keeps, and runs one real MSE step and one real SP step (SGD, so the optimiser holds
no extra copy of the 866M parameters). On 32x32 latents: the network is the same at any latent
size, and a step at the paper's 64x64 takes 2.5 times as long on two cores (66 s vs 27 s for the
whole test); benchmarks/sp_step.py --shape sd21 --latent 64 measures that size, on a GPU.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel

from selfperceptual.method.losses import MSELoss, SelfPerceptualLoss
from selfperceptual.method.models import SD21_BASE_UNET, SD21_TEXT_TOKENS
from selfperceptual.method.schedule import Schedule
from selfperceptual.method.unet import Denoiser, PerceptualNetwork

pytestmark = pytest.mark.slow


def test_sd21_base_unet_trains_one_mse_and_one_sp_step_with_a_truncated_frozen_network():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_BASE_UNET).train()
    frozen = PerceptualNetwork.frozen_copy(unet, "midblock")
    unet_parameters, frozen_parameters = sum(p.numel() for p in unet.parameters()), frozen.num_parameters()
    print(f"\nSD 2.1-base UNet: {unet_parameters / 1e6:.1f}M parameters; frozen mid-block network f*_l: {frozen_parameters / 1e6:.1f}M")
    assert 860e6 < unet_parameters < 870e6
    assert 340e6 < frozen_parameters < 360e6
    assert {name.split(".")[0] for name, _ in frozen.named_parameters()} == {"conv_in", "time_embedding", "down_blocks", "mid_block"}

    schedule, denoiser = Schedule.zero_snr(), Denoiser(unet)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 32, 32, generator=generator)
    context = torch.randn(1, SD21_TEXT_TOKENS, SD21_BASE_UNET["cross_attention_dim"], generator=generator)
    optimizer = torch.optim.SGD(unet.parameters(), lr=1e-4)
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items() if k.startswith("mid_block")}
    probe = unet.up_blocks[-1].resnets[-1].conv2.weight  # a layer f*_l does not have: reached only through the online model
    for loss_fn in (MSELoss(schedule), SelfPerceptualLoss(schedule, frozen)):
        before = probe.detach().clone()
        per_sample, _ = loss_fn(denoiser, x0, context, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()
        assert torch.isfinite(per_sample).all()
        assert not torch.equal(probe.detach(), before), f"{type(loss_fn).__name__} did not update the online UNet"
    assert all(p.grad is None for p in frozen.parameters())
    assert all(torch.equal(v, frozen_before[k]) for k, v in frozen.state_dict().items() if k in frozen_before)
