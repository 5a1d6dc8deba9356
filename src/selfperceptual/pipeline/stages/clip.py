"""clip: a tiny CLIP trained on the downloaded images and their captions (the small scales, where no
CLIP weights exist), saved as a Hugging Face CLIP folder that clip-retrieval loads (tinyclip.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import tracking
from ..data.shards import iter_samples
from ..io import write_json
from ..tinyclip import train_tiny_clip

log = logging.getLogger("clip")
PARAMS = ("clip", "download.resolution", "corpus.seed")


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=Path, action="append", required=True, help="a download stage's folder (repeat for each part)")


def run(args, config, scale, out):
    if config.clip.model is not None:
        raise SystemExit(f"clip: clip.model is {config.clip.model!r}, so there is no tiny CLIP to train; the DAG has no clip stage at this scale")
    samples = list(iter_samples(args.images))
    if len(samples) < config.clip.tiny.batch:
        raise SystemExit(f"clip: {len(samples)} downloaded images in {', '.join(map(str, args.images))}, fewer than one batch ({config.clip.tiny.batch})")
    images, captions = [image for _, image, _ in samples], [caption for _, _, caption in samples]
    metrics = train_tiny_clip(images, captions, config.clip.tiny, config.download.resolution, config.corpus.seed, out / "model")
    metrics["images"] = len(samples)
    write_json(out / "metrics.json", metrics)
    log.info("clip: %s", metrics)
    return lambda: tracking.log_run(scale, stage=args.out.name, params={"clip": config.clip.model_dump()}, tags={"kind": "clip"}, metrics=metrics)
