"""sample: deterministic DDIM from t = T over the held-out captions, one seed per image."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..experiments import SAMPLE_ROWS
from ..io import write_json
from ..models import load_pipeline
from ..sampling import generate

log = logging.getLogger("sample")


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="folder whose pipeline/ samples")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder (eval captions)")
    parser.add_argument("--row", choices=sorted(SAMPLE_ROWS), required=True, help="the sampling row (steps, CFG, rescale)")


def run(args, config, scale, out) -> None:
    settings, row = config.sample, SAMPLE_ROWS[args.row]
    captions = pd.read_parquet(args.corpus / "eval.parquet")["caption"].tolist()[: settings.num_images]
    prompts = captions if row.conditioning == "text" else [""] * len(captions)
    seeds = [settings.seed + index for index in range(len(prompts))]
    pipeline = load_pipeline(args.model / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    (out / "images").mkdir()
    for start in tqdm(range(0, len(prompts), settings.batch), desc="sample", mininterval=5):
        batch = slice(start, start + settings.batch)
        images = generate(pipeline, prompts[batch], seeds[batch], row.steps, row.cfg, row.rescale, settings.eta)
        for offset, image in enumerate(images):
            image.save(out / "images" / f"{start + offset:05d}.png")
    write_json(
        out / "samples.json",
        {"row": row.name, "prompts": prompts, "captions": captions, "seeds": seeds, "steps": row.steps, "cfg": row.cfg, "rescale": row.rescale, "conditioning": row.conditioning},
    )
    log.info("sample: %d images, %d steps, cfg %s, rescale %s", len(prompts), row.steps, row.cfg, row.rescale)
