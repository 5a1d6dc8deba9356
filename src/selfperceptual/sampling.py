"""Deterministic DDIM sampling through diffusers' StableDiffusionPipeline, one seed per image."""

from __future__ import annotations

import torch
from PIL import Image


def generate(pipeline, prompts: list[str], seeds: list[int], steps: int, cfg: float | None, rescale: float | None, eta: float = 0.0) -> list[Image.Image]:
    """CFG is off when ``cfg`` is None (guidance_scale 1); rescale is diffusers' guidance_rescale."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=cfg if cfg is not None else 1.0,
        guidance_rescale=rescale or 0.0,
        eta=eta,
        generator=generators,
        output_type="pil",
    ).images


def grid(columns: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Images side by side: one column per list, one row per prompt."""
    width, height = columns[0][0].size
    rows = len(columns[0])
    canvas = Image.new("RGB", (len(columns) * (width + pad) + pad, rows * (height + pad) + pad), (255, 255, 255))
    for c, column in enumerate(columns):
        for r, image in enumerate(column):
            canvas.paste(image, (pad + c * (width + pad), pad + r * (height + pad)))
    return canvas
