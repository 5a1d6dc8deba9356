"""Deterministic DDIM sampling through diffusers' StableDiffusionPipeline, one seed per image."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


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


def grid(columns: list[list[Image.Image]], pad: int = 2, min_side: int = 0, headings: list[str] | None = None,
         row_labels: list[str] | None = None) -> Image.Image:
    """Images side by side: one column per list, one row per prompt. Images smaller than
    ``min_side`` are enlarged by a whole factor (nearest neighbour, so no pixel is invented).
    ``headings`` are written above the columns and ``row_labels`` left of the rows, in the image."""
    factor = max(1, -(-min_side // min(columns[0][0].size)))
    if factor > 1:
        columns = [[image.resize((image.width * factor, image.height * factor), Image.NEAREST) for image in column] for column in columns]
    width, height = columns[0][0].size
    rows = len(columns[0])
    font = ImageFont.load_default(size=max(10, min(18, width // 7)))
    top = int(font.size * 1.6) if headings else 0
    left = (max(int(font.getlength(label)) for label in row_labels) + 3 * pad) if row_labels else 0
    canvas = Image.new("RGB", (left + len(columns) * (width + pad) + pad, top + rows * (height + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        x = left + pad + c * (width + pad)
        if headings:
            draw.text((x + width / 2, top / 2), headings[c], fill=(0, 0, 0), font=font, anchor="mm")
        for r, image in enumerate(column):
            canvas.paste(image, (x, top + pad + r * (height + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((pad, top + pad + r * (height + pad) + height / 2), label, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas
