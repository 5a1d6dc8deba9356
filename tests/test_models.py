"""The tiny SD-shaped base model: built offline, saved, reloaded and sampled like SD 2.1-base."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from selfperceptual.method.device import Runtime
from selfperceptual.method.models import (
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    ddim_scheduler,
    encode_prompts,
    load_pipeline,
)
from selfperceptual.method.sampling import generate


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, smoke_config):
    base = smoke_config.base
    tokenizer = build_tokenizer(["a red circle on a white background", "a large blue square"], base.text.max_length)
    text_encoder = build_text_encoder(tokenizer, base.text, 0)
    vae = build_vae(base.vae, 32, 0)
    unet = build_unet(base.unet, 32 // 2 ** (len(base.vae.block_out_channels) - 1), 4, base.text.hidden_size, 0)
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    assemble_pipeline(vae, text_encoder, tokenizer, unet, ddim_scheduler(smoke_config.schedule)).save_pretrained(folder)
    return folder


def test_tokenizer_splits_words_and_pads():
    tokenizer = build_tokenizer(["a red circle"], 8)
    ids = tokenizer("A red, circle!", padding="max_length", max_length=8).input_ids
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words[:5] == ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"]
    assert words[5:] == ["<|pad|>"] * 3
    assert tokenizer("a purple cat").input_ids[2] == tokenizer.unk_token_id


def test_pipeline_reloads_with_the_papers_sampler(saved_pipeline):
    pipeline = StableDiffusionPipeline.from_pretrained(saved_pipeline)
    scheduler = pipeline.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.set_alpha_to_one and scheduler.alphas_cumprod[-1].item() == 0.0
    assert "trained_betas" not in scheduler.config or scheduler.config.trained_betas is None


def test_our_text_embeddings_equal_the_pipelines(saved_pipeline):
    pipeline = load_pipeline(saved_pipeline)
    ours = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["a red circle", ""])
    theirs, _ = pipeline.encode_prompt(["a red circle", ""], "cpu", 1, False)
    assert torch.equal(ours, theirs)


def test_sampling_is_deterministic_per_seed_and_cfg_changes_it(saved_pipeline):
    pipeline = load_pipeline(saved_pipeline)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a large blue square"]
    first = generate(pipeline, prompts, [0, 1], steps=5, cfg=None, rescale=None)
    again = generate(pipeline, prompts[:1], [0], steps=5, cfg=None, rescale=None)
    guided = generate(pipeline, prompts, [0, 1], steps=5, cfg=7.5, rescale=0.7)
    def difference(a, b):
        return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))

    # The same seed gives the same image whatever the batch (up to one level of rounding, from
    # batch-size-dependent float summation order); another seed or CFG gives another image.
    assert difference(first[0], again[0]).max() <= 1
    assert difference(first[0], first[1]).mean() > 2
    assert difference(first[0], guided[0]).mean() > 2
    assert first[0].size == (32, 32)


def test_the_x0_trajectory_is_the_schedulers_own_and_ends_in_the_final_image(saved_pipeline):
    from selfperceptual.pipeline.stages.figures import x0_trajectory

    pipeline = load_pipeline(saved_pipeline)
    pipeline.set_progress_bar_config(disable=True)
    headings, images = x0_trajectory(pipeline, "a red circle", 3, None, None)
    assert headings == [f"t={t}" for t in range(1000, 0, -100)] + ["final"] and len(images) == 11
    assert "step" not in vars(pipeline.scheduler)  # the recording hook is gone
    final = np.asarray(images[-1], dtype=np.int16)
    assert np.abs(np.asarray(images[-2], dtype=np.int16) - final).max() <= 1  # the last step's x0 is the sample (alpha = 1 at the end)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - final).mean() > 1  # and the first is not yet
    again = generate(pipeline, ["a red circle"], [3], 10, None, None)[0]
    assert np.array_equal(np.asarray(again), np.asarray(images[-1]))  # recording changes nothing


def _cascade(pipeline):
    from selfperceptual.method.cascade import CascadedUNet, module_two
    from selfperceptual.method.schedule import Schedule

    return CascadedUNet(pipeline.unet, module_two(pipeline.unet), Schedule.zero_snr())


def test_casdm_pipeline_round_trips_and_samples_as_its_modules_say(saved_pipeline, tmp_path):
    """A Cas-DM folder reloads with from_pretrained as a CasDMPipeline; with module two as made (a zero
    correction) it samples exactly as the MSE pipeline, and with a correction its DDIM step takes
    module two's x0 with module one's eps."""
    from selfperceptual.method.cascade import CasDMPipeline
    from selfperceptual.method.models import save_trained

    plain = load_pipeline(saved_pipeline)
    plain.set_progress_bar_config(disable=True)
    cascade = _cascade(plain)
    save_trained(saved_pipeline, cascade, folder := tmp_path / "pipeline", "casdm")
    reloaded = CasDMPipeline.from_pretrained(folder)
    assert isinstance(load_pipeline(folder), CasDMPipeline) and reloaded.x0_unet.config.in_channels == 8
    reloaded.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a large blue square"]
    for cfg, rescale in ((None, None), (3.0, 0.7)):
        ours, theirs = (np.asarray(generate(p, prompts, [0, 1], 5, cfg, rescale)[0], dtype=int) for p in (reloaded, plain))
        assert np.abs(ours - theirs).max() <= 1
    # A correction of +delta to every x0: one DDIM step moves x_t by sqrt(alpha_bar_prev) * delta more.
    with torch.no_grad():
        reloaded.x0_unet.conv_out.bias.fill_(0.1)
    one_step = {name: p(prompts[:1], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
                for name, p in (("cascade", reloaded), ("plain", plain))}  # fmt: skip
    assert torch.allclose(one_step["cascade"] - one_step["plain"], torch.full_like(one_step["plain"], 0.1), atol=1e-5)  # alpha_bar at t=0 is 1
    # A stage's runtime places module two with the others (on a GPU, in the stage's precision).
    Runtime(torch.device("cpu"), torch.bfloat16).place_pipeline(reloaded)
    assert {p.dtype for p in reloaded.x0_unet.parameters()} == {torch.bfloat16}


def test_casdm_loss_trains_module_two_with_the_metric_and_module_one_without(saved_pipeline, smoke_config):
    from selfperceptual.method.cascade import FeatnetLPIPS
    from selfperceptual.method.featnet import TinyFeatureNet
    from selfperceptual.method.losses import CascadeLoss, MSELoss
    from selfperceptual.method.schedule import Schedule
    from selfperceptual.method.unet import Denoiser

    pipeline = load_pipeline(saved_pipeline)
    cascade, schedule = _cascade(pipeline), Schedule.zero_snr()
    metric = FeatnetLPIPS(TinyFeatureNet(num_classes=6, feature_dim=16))
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(4, smoke_config.base.text.max_length, smoke_config.base.text.hidden_size, generator=torch.Generator().manual_seed(1))
    eps, t = torch.randn_like(x0), torch.tensor([999, 600, 150, 20])
    loss = CascadeLoss(schedule, pipeline.vae, metric, x0_weight=1.0, metric_weight=1.0)
    per_sample, _ = loss(cascade, x0, context, eps=eps, t=t)
    v_only, _ = MSELoss(schedule)(Denoiser(pipeline.unet), x0, context, eps=eps, t=t)
    assert (per_sample > v_only + 1e-6).all()  # the x0 and metric terms add to the v error
    # Module one's gradient is the MSE loss's alone: the x0 and metric terms stop at module two.
    one = torch.autograd.grad(per_sample.sum(), list(pipeline.unet.parameters()), allow_unused=True)
    alone = torch.autograd.grad(v_only.sum(), list(pipeline.unet.parameters()), allow_unused=True)
    assert [a is None for a in one] == [b is None for b in alone] and sum(a is not None for a in one) > len(one) // 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, alone, strict=True) if a is not None)
    # The metric's gradient reaches module two (through its zero output layer first), never the VAE or the metric.
    no_metric = CascadeLoss(schedule, pipeline.vae, metric, x0_weight=1.0, metric_weight=0.0)
    with_metric, _ = loss(cascade, x0, context, eps=eps, t=t)
    without, _ = no_metric(cascade, x0, context, eps=eps, t=t)
    (grad_with,) = torch.autograd.grad(with_metric.sum(), [cascade.x0_unet.conv_out.weight])
    (grad_without,) = torch.autograd.grad(without.sum(), [cascade.x0_unet.conv_out.weight])
    assert (grad_with - grad_without).abs().max() > 1e-6
    assert not any(p.requires_grad for p in (*pipeline.vae.parameters(), *metric.parameters()))
    # LPIPS of an image with itself is zero, and of another image more.
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert metric(images, images).abs().max() == 0 and (metric(images, images.flip(0)) > 0).all()
