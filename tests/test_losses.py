"""Exactness of the self-perceptual objective (Algorithm 1, Eq. 5-16) and of the frozen network."""

import pytest
import torch

from selfperceptual.method.losses import T_PRIME_SAMPLERS, MSELoss, SelfPerceptualLoss
from selfperceptual.method.schedule import Schedule
from selfperceptual.method.unet import Denoiser, PerceptualNetwork


def _sp_loss(unet, **variant):
    return SelfPerceptualLoss(Schedule.zero_snr(), PerceptualNetwork.frozen_copy(unet, variant.pop("layer", "midblock")), **variant)


def test_t_prime_equal_t_gives_zero_loss_but_sp2_does_not(tiny_unet, latents, context):
    """Eq. 12: at t' = t, forward(x0_hat, eps_hat, t) is x_t itself, so SP sees no difference."""
    tiny_unet.double()
    x0, ctx = latents.double(), context.double()
    t = torch.tensor([0, 250, 600, 999])
    sp, _ = _sp_loss(tiny_unet)(Denoiser(tiny_unet), x0, ctx, t=t, t_prime=t)
    sp2, _ = _sp_loss(tiny_unet, formulation="sp2")(Denoiser(tiny_unet), x0, ctx, t=t, t_prime=t)
    assert sp.abs().max().item() < 1e-20
    assert (sp2[:3] > 1e-6).all()  # Eq. 13-16 keeps a signal at t' = t (at t = 999 eps_hat is exact)
    random_t_prime, _ = _sp_loss(tiny_unet)(Denoiser(tiny_unet), x0, ctx, t=t, t_prime=torch.tensor([900, 10, 300, 500]))
    assert (random_t_prime > 1e-6).all()


def test_prediction_is_renoised_with_predicted_eps(tiny_unet, latents, context):
    """The predicted branch is forward(x0_hat, eps_hat, t'), not forward(x0_hat, eps, t')."""
    schedule = Schedule.zero_snr()
    loss = _sp_loss(tiny_unet)
    seen = []
    original = loss.perceptual.features
    loss.perceptual.features = lambda x, t, c: seen.append(x.detach().clone()) or original(x, t, c)
    eps = torch.randn_like(latents)
    t, t_prime = torch.tensor([100, 400, 700, 900]), torch.tensor([300, 50, 800, 999])
    loss(Denoiser(tiny_unet), latents, context, eps=eps, t=t, t_prime=t_prime)
    with torch.no_grad():
        x_t = schedule.add_noise(latents, eps, t)
        v_hat = Denoiser(tiny_unet)(x_t, t, context)
        x0_hat, eps_hat = schedule.x0_from_v(x_t, v_hat, t), schedule.eps_from_v(x_t, v_hat, t)
    real, predicted = seen
    assert torch.allclose(real, schedule.add_noise(latents, eps, t_prime))
    assert torch.allclose(predicted, schedule.add_noise(x0_hat, eps_hat, t_prime), atol=1e-6)
    assert not torch.allclose(predicted, schedule.add_noise(x0_hat, eps, t_prime), atol=1e-3)


def test_gradients_reach_every_online_parameter_and_none_the_frozen(tiny_unet, latents, context):
    loss = _sp_loss(tiny_unet)
    frozen_before = {k: v.clone() for k, v in loss.perceptual.state_dict().items()}
    optimizer = torch.optim.Adam(tiny_unet.parameters(), lr=1e-2)
    for step in range(2):
        per_sample, _ = loss(Denoiser(tiny_unet), latents, context, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        per_sample.mean().backward()
        missing = [n for n, p in tiny_unet.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"no gradient reached {missing[:5]}"
        assert all(p.grad is None for p in loss.perceptual.parameters())
        optimizer.step()
    assert all(not p.requires_grad for p in loss.perceptual.parameters())
    for key, value in loss.perceptual.state_dict().items():
        assert torch.equal(value, frozen_before[key]), f"frozen {key} changed"


def test_real_branch_builds_no_graph(tiny_unet, latents, context):
    loss = _sp_loss(tiny_unet)
    outputs = []
    original = loss.perceptual.features
    loss.perceptual.features = lambda x, t, c: outputs.append(original(x, t, c)) or outputs[-1]
    loss(Denoiser(tiny_unet), latents, context)
    real, predicted = outputs
    assert all(f.grad_fn is None and not f.requires_grad for f in real)
    assert all(f.requires_grad for f in predicted)


def test_midblock_network_is_truncated_and_matches_full_unet(tiny_unet, latents, context):
    network = PerceptualNetwork.frozen_copy(tiny_unet, "midblock")
    kept = {name.split(".")[0] for name, _ in network.named_parameters()}
    assert kept == {"conv_in", "time_embedding", "down_blocks", "mid_block"}
    captured = {}
    hook = tiny_unet.mid_block.register_forward_hook(lambda module, args, output: captured.setdefault("mid", output))
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        tiny_unet(latents, t, encoder_hidden_states=context)
    hook.remove()
    assert torch.equal(network.features(latents, t, context)[0], captured["mid"])
    assert network.num_parameters() < sum(p.numel() for p in tiny_unet.parameters())


@pytest.mark.parametrize(
    "layer, blocks",
    [("encoder", "down_blocks"), ("decoder", "up_blocks"), ("encoder_midblock", None)],
)
def test_other_layers_match_hooks(tiny_unet, latents, context, layer, blocks):
    network = PerceptualNetwork.frozen_copy(tiny_unet, layer)
    captured = []
    modules = list(tiny_unet.down_blocks) if layer != "decoder" else list(tiny_unet.up_blocks)
    if layer == "encoder_midblock":
        modules.append(tiny_unet.mid_block)
    hooks = [m.register_forward_hook(lambda mod, a, out: captured.append(out[0] if isinstance(out, tuple) else out)) for m in modules]
    t = torch.tensor([5, 50, 500, 990])
    with torch.no_grad():
        tiny_unet(latents, t, encoder_hidden_states=context)
    for hook in hooks:
        hook.remove()
    features = network.features(latents, t, context)
    assert len(features) == len(captured)
    for ours, theirs in zip(features, captured):
        assert torch.equal(ours, theirs)


def test_network_loads_from_the_frozen_unet_folder_with_only_the_parts_it_needs(tiny_unet, latents, context, tmp_path):
    tiny_unet.save_pretrained(tmp_path / "network")  # what the freeze stage writes
    t = torch.tensor([1, 2, 3, 4])
    for layer in ("midblock", "decoder", "encoder"):
        loaded = PerceptualNetwork.load(tmp_path / "network", layer)
        expected = PerceptualNetwork.frozen_copy(tiny_unet, layer).features(latents, t, context)
        assert all(torch.equal(a, b) for a, b in zip(loaded.features(latents, t, context), expected))
        assert not any(p.requires_grad for p in loaded.parameters())
        parts = {name.split(".")[0] for name, _ in loaded.named_parameters()}
        assert ("up_blocks" in parts) == (layer == "decoder")
        assert ("mid_block" in parts) == (layer != "encoder")


def test_mse_loss_is_v_prediction_error(tiny_unet, latents, context):
    schedule = Schedule.zero_snr()
    eps, t = torch.randn_like(latents), torch.tensor([0, 300, 700, 999])
    per_sample, _ = MSELoss(schedule)(Denoiser(tiny_unet), latents, context, eps=eps, t=t)
    with torch.no_grad():
        v_hat = tiny_unet(schedule.add_noise(latents, eps, t), t, encoder_hidden_states=context).sample
    expected = ((v_hat - schedule.v_target(latents, eps, t)) ** 2).flatten(1).mean(1)
    assert torch.allclose(per_sample.detach(), expected, atol=1e-6)


@pytest.mark.parametrize("rule", sorted(T_PRIME_SAMPLERS))
def test_t_prime_rules_stay_in_range(rule):
    t = torch.tensor([0, 10, 500, 990, 999] * 200)
    t_prime = T_PRIME_SAMPLERS[rule](t, 1000, torch.Generator().manual_seed(0))
    assert t_prime.dtype == torch.long and t_prime.min() >= 0 and t_prime.max() <= 999
    if rule == "near40":
        assert ((t_prime - t).abs() <= 40).all()
    other_t = T_PRIME_SAMPLERS[rule](torch.flip(t, [0]), 1000, torch.Generator().manual_seed(0))
    if rule == "uniform":  # drawn independently of t: the same draws whatever t is
        assert torch.equal(t_prime, other_t)
    else:
        assert not torch.equal(t_prime, other_t)


@pytest.fixture
def tiny_vae():
    from types import SimpleNamespace

    from selfperceptual.method.models import build_vae

    return build_vae(SimpleNamespace(block_out_channels=[16, 32, 32], latent_channels=4, norm_num_groups=8), resolution=32, seed=0)


def test_lpl_is_the_mse_loss_at_high_noise_and_adds_a_term_below_its_threshold(tiny_unet, tiny_vae, latents, context):
    from selfperceptual.method.losses import LatentPerceptualLoss

    schedule, eps = Schedule.zero_snr(), torch.randn_like(latents)
    lpl, mse = LatentPerceptualLoss(schedule, tiny_vae, t_threshold=200), MSELoss(schedule)
    t = torch.tensor([999, 600, 150, 20])
    ours, _ = lpl(Denoiser(tiny_unet), latents, context, eps=eps, t=t)
    plain, _ = mse(Denoiser(tiny_unet), latents, context, eps=eps, t=t)
    assert torch.equal(ours[:2], plain[:2])
    assert (ours[2:] > plain[2:] + 1e-6).all()
    assert lpl.perceptual(latents, latents).abs().max().item() == 0.0  # x0_hat = x0: no perceptual term


@pytest.mark.parametrize("t", [[999, 600, 400, 20], [999, 150, 600, 20], [10, 150, 199, 200]], ids=["1-of-4", "2-of-4", "3-of-4"])
def test_lpl_weight_is_the_references_weight_on_the_mean_over_the_samples_below_the_threshold(tiny_unet, tiny_vae, latents, context, t):
    """The diffusers research project's loss is ``mse.mean() + lpl_weight * lpl[t < 200].mean()``:
    the batch mean of our per-sample loss must be that, whatever share of the batch is below the
    threshold (t = 200 itself is not below it)."""
    from selfperceptual.method.losses import LatentPerceptualLoss

    schedule, eps, t = Schedule.zero_snr(), torch.randn_like(latents), torch.tensor(t)
    weight = 0.7
    ours, _ = LatentPerceptualLoss(schedule, tiny_vae, weight=weight, t_threshold=200)(Denoiser(tiny_unet), latents, context, eps=eps, t=t)
    with torch.no_grad():
        x_t = schedule.add_noise(latents, eps, t)
        v_hat = Denoiser(tiny_unet)(x_t, t, context)
        v = schedule.v_target(latents, eps, t)
        mse = ((v_hat.float() - v.float()) ** 2).mean((1, 2, 3))
        below = t < 200
        x0_hat = schedule.x0_from_v(x_t, v_hat, t)[below]
        lpl = LatentPerceptualLoss(schedule, tiny_vae).perceptual(x0_hat, latents[below])
    assert lpl.min() > 1e-6  # the term is there to weigh
    assert torch.allclose(ours.mean(), mse.mean() + weight * lpl.mean(), rtol=1e-6, atol=0)
    term = ours.mean() - mse.mean()  # not the term averaged over the whole batch
    assert torch.allclose(term, weight * lpl.mean(), rtol=1e-3) and not torch.allclose(term, weight * lpl.sum() / len(t), rtol=0.1)


def test_lpl_features_lie_on_the_decoders_own_path(tiny_vae, latents):
    from selfperceptual.method.losses import LatentPerceptualLoss

    lpl = LatentPerceptualLoss(Schedule.zero_snr(), tiny_vae)
    decoder = tiny_vae.decoder
    with torch.no_grad():
        last = lpl.features(latents)[-1]
        image = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(last)))
        assert torch.allclose(image, tiny_vae.decode(latents / tiny_vae.config.scaling_factor).sample, atol=1e-6)
    assert [f.shape[-1] for f in lpl.features(latents)] == [8, 16, 32, 32]


def test_lpl_gradients_reach_the_unet_and_never_the_vae(tiny_unet, tiny_vae, latents, context):
    """The perceptual term has gradients of its own: weight 1 and weight 0 (the MSE term alone)
    give different UNet gradients; none reach the frozen VAE."""
    from selfperceptual.method.losses import LatentPerceptualLoss

    def gradients(weight: float) -> list[torch.Tensor]:
        tiny_unet.zero_grad(set_to_none=True)
        lpl = LatentPerceptualLoss(Schedule.zero_snr(), tiny_vae, weight=weight, t_threshold=1000)
        per_sample, _ = lpl(Denoiser(tiny_unet), latents, context, generator=torch.Generator().manual_seed(0))
        per_sample.mean().backward()
        assert all(p.grad is None and not p.requires_grad for p in tiny_vae.parameters())
        return [p.grad.clone() for p in tiny_unet.parameters() if p.requires_grad]

    with_term, mse_only = gradients(1.0), gradients(0.0)
    assert all(torch.isfinite(g).all() for g in with_term)
    differs = [not torch.allclose(a, b) for a, b in zip(with_term, mse_only, strict=True)]
    assert sum(differs) > len(differs) // 2  # the term reaches most of the UNet, not just its last layer


def test_lpl_outlier_mask_masks_a_cluster_with_a_margin_and_keeps_an_isolated_value():
    """Berrada et al.'s rule: dilating the kept mask by 3 refills a lone outlier; eroding it by 5
    widens a masked cluster by 2 on every side."""
    from selfperceptual.method.losses import _outlier_mask

    smooth = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32)
    assert _outlier_mask(smooth, down=1).min().item() == 1.0
    lone = smooth.clone()
    lone[0, 0, 16, 16] = 1000.0
    assert _outlier_mask(lone, down=1).min().item() == 1.0
    cluster = smooth.clone()
    cluster[0, 0, 14:18, 14:18] = 1000.0  # 4x4: its inner 2x2 survives the dilation
    mask = _outlier_mask(cluster, down=1)[0, 0]
    assert (mask[13:19, 13:19] == 0).all() and (mask == 0).sum().item() == 36
