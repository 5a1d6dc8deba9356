"""One helper decides each stage's device and precision; half-precision stages give what fp32 gives, nearly."""

import numpy as np
import torch
from conftest import run_stage
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from selfperceptual.method.device import runtime
from selfperceptual.method.models import load_pipeline
from selfperceptual.pipeline.training import LatentData


def test_runtime_places_models_with_sdpa_in_the_named_precision(tiny_unet):
    device = runtime("bf16")
    assert device.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and device.dtype == torch.bfloat16
    tiny_unet.set_default_attn_processor()  # the plain processor: place() must put SDPA back
    device.place(tiny_unet)
    assert tiny_unet.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in tiny_unet.attn_processors.values())
    assert all(p.dtype == torch.bfloat16 for p in tiny_unet.parameters()) and not tiny_unet.training


def test_pipeline_loads_in_the_stage_precision(smoke_stages):
    pipeline = load_pipeline(smoke_stages / "base" / "pipeline", runtime("fp16"))
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float16}


def test_half_precision_sampling_and_encoding_match_fp32(smoke_stages, tmp_path):
    runs = smoke_stages
    common = ["--model", runs / "base", "--corpus", runs / "corpus", "--row", "mse_s25", "--set", "sample.num_images=4", "--set", "sample.batch=4"]
    run_stage("sample", tmp_path / "fp32", *common)
    run_stage("sample", tmp_path / "bf16", *common, "--set", "sample.precision=bf16")
    for name in ("00000.png", "00003.png"):
        full, half = (np.asarray(Image.open(tmp_path / p / "images" / name), dtype=np.float32) for p in ("fp32", "bf16"))
        assert np.abs(full - half).mean() < 6.0, "bf16 sampling drifted from fp32"  # of 255
    run_stage("encode", tmp_path / "encode_bf16", "--images", runs / "download", "--base", runs / "base", "--set", "encode.precision=bf16")
    full, half = LatentData([runs / "encode"]), LatentData([tmp_path / "encode_bf16"])
    assert len(full) == len(half)
    a, b = full._rows(5)[0], half._rows(5)[0]
    assert a.dtype == b.dtype == torch.float32 and (a - b).abs().mean() < 0.05 * a.abs().mean()
