"""evaluate: FID, Inception Score and precision/recall of one sampling row against the real reference images."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

from .. import tracking
from ..device import runtime
from ..evaluation import check_featnet, extract, load_extractor, metrics
from ..experiments import ABLATION_RUNS, ALL_ROWS
from ..io import write_json
from ..sampling import grid, sample_images

log = logging.getLogger("evaluate")
GRID_IMAGES = 16


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=Path, action="append", required=True, help="a sample stage's folder (repeat for each part)")
    parser.add_argument("--featnet", type=Path, required=True, help="the featnet stage's folder")


def run(args, config, scale, out) -> None:
    check_featnet(args.featnet)
    sampled, paths = sample_images(args.samples)
    row = ALL_ROWS[sampled["row"]]
    images = [Image.open(path).convert("RGB") for path in paths]
    device = runtime(config.evaluate.precision)
    features, logits = extract(load_extractor(args.featnet, device), images, config.evaluate.batch, device)
    scores = {
        **metrics(features, logits, load_file(args.featnet / "reference.safetensors"), config.evaluate.is_splits),
        "num_images": len(images),
    }
    write_json(out / "metrics.json", {"row": row.name, **scores})
    grid([images[:GRID_IMAGES]]).save(out / "samples.png")
    tags = {
        "kind": "evaluate",
        "row": row.name,
        "tables": " ".join(row.tables),  # filter with tags.tables LIKE '%table3%'
        "model": row.model,
        "ablation": row.model.removeprefix("train_sp_") if row.model in {run.name for run in ABLATION_RUNS} else "none",
        "objective": row.objective,
        "conditioning": row.conditioning,
        "cfg": row.cfg if row.cfg is not None else "none",
        "rescale": row.rescale if row.rescale is not None else "none",
        "steps": row.steps,
        "nfe": row.nfe,
    }
    log.info("evaluate %s: FID %.2f, IS %.2f, precision %.3f, recall %.3f", row.name, scores["fid"], scores["is"], scores["precision"], scores["recall"])
    return lambda: tracking.log_run(
        scale,
        stage=args.out.name,
        params={"row": row.name, "model": row.model, "sample": config.sample.model_dump(), "evaluate": config.evaluate.model_dump(), "steps": sampled["steps"]},
        tags=tags,
        metrics=scores,
        images=[args.out / "samples.png"],
    )
