"""sample: deterministic DDIM from t = T over the held-out captions, one seed per image.

With ``sample.num_jobs`` > 1 each job samples a block of whole batches (``--part I/N``); the
images are the same whatever the split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ...method.device import runtime
from ..experiments import row_named
from ..io import background_writes, read_json, write_json
from ...method.models import load_stage_pipeline
from ...method.sampling import generate
from ..split import add_part_argument, batch_block, checked_part

log = logging.getLogger("sample")
PARAMS = ("sample",)


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="folder whose pipeline/ samples")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder (eval captions)")
    parser.add_argument("--row", required=True, help="the sampling row (steps, CFG, rescale), e.g. sp_s25 or sp_s25_seed1")
    add_part_argument(parser, "the images (in blocks of sample.batch)")


def run(args, config, scale, out) -> None:
    try:
        row = row_named(args.row)
    except KeyError as error:
        raise SystemExit(f"--row {args.row}: {error.args[0]}") from None
    settings = config.sample
    index, count = checked_part(args.part, settings.num_jobs, "sample.num_jobs")
    captions = pd.read_parquet(args.corpus / "eval.parquet")["caption"].tolist()[: settings.num_images]
    prompts = captions if row.conditioning == "text" else [""] * len(captions)
    seeds = [settings.seed + position for position in range(len(prompts))]
    todo = batch_block(len(prompts), settings.batch, index, count)
    device = runtime(settings.precision)
    pipeline = load_stage_pipeline("model", args.model, device)
    pipeline.set_progress_bar_config(disable=True)
    log.info("sample %s on %s", row.name, device.describe())
    (out / "images").mkdir()
    with background_writes() as write:  # PNG encoding on other cores while the next batch samples
        for start in tqdm(range(todo.start, todo.stop, settings.batch), desc="sample", mininterval=5):
            batch = slice(start, min(start + settings.batch, todo.stop))
            images = generate(pipeline, prompts[batch], seeds[batch], row.steps, row.cfg, row.rescale, settings.eta)
            for offset, image in enumerate(images):
                write(image.save, out / "images" / f"{start + offset:05d}.png")
    trained = read_json(args.model / "tracking.json") if (args.model / "tracking.json").is_file() else {}  # the MLflow run that trained it, if one did
    write_json(
        out / "samples.json",
        {"row": row.name, "model_run_id": trained.get("run_id"), "model_id": trained.get("model_id"), "prompts": prompts, "captions": captions, "seeds": seeds, "steps": row.steps, "cfg": row.cfg,
         "rescale": row.rescale, "conditioning": row.conditioning, "part": [index, count], "images": [todo.start, todo.stop]},
    )
    log.info("sample %d/%d: images %d-%d of %d, %d steps, cfg %s, rescale %s", index, count, todo.start, todo.stop, len(prompts), row.steps, row.cfg, row.rescale)
