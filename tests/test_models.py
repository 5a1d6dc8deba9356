"""The tiny SD-shaped base model: built offline, saved, reloaded and sampled like SD 2.1-base."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from selfperceptual.models import (
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    ddim_scheduler,
    encode_prompts,
    load_pipeline,
)
from selfperceptual.sampling import generate


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
    from selfperceptual.stages.figures import x0_trajectory

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
