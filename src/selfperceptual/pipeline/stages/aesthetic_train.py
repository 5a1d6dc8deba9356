"""aesthetic_train: the LAION aesthetic predictor's architecture, narrower, fitted to corpus images'
AESTHETIC_SCORE over the tiny CLIP's image embeddings (the small scales, where no predictor weights
exist). Rows are drawn from the whole corpus, before the filter, so the scores span the range the
threshold cuts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import tracking
from ..aesthetics import train_predictor
from ..io import write_json
from ..tinyclip import image_embeddings

log = logging.getLogger("aesthetic_train")
PARAMS = ("aesthetic", "clip", "corpus.seed")


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder")
    parser.add_argument("--clip", type=Path, help="the clip stage's folder (the tiny CLIP, when clip.model is null)")


def _readable(corpus: Path, rows: pd.DataFrame) -> tuple[list[Image.Image], list[float]]:
    images, scores = [], []
    for url, score in zip(rows["URL"], rows["AESTHETIC_SCORE"], strict=True):
        try:
            images.append(Image.open(corpus / url).convert("RGB"))
        except OSError:  # the corpus's dead and corrupt rows, as LAION has them
            continue
        scores.append(float(score))
    return images, scores


def run(args, config, scale, out):
    settings = config.aesthetic
    if settings.weights is not None:
        raise SystemExit(f"aesthetic_train: aesthetic.weights is {settings.weights!r}, so there is nothing to fit; the DAG has no such stage at this scale")
    rows = pd.read_parquet(args.corpus / "laion.parquet")
    rows = rows.sample(n=min(settings.train_rows, len(rows)), random_state=config.corpus.seed)
    images, scores = _readable(args.corpus, rows)
    embeddings = image_embeddings(config.clip.model or args.clip / "model", images, config.clip.batch)
    predictor, error = train_predictor(embeddings, np.array(scores), tuple(settings.hidden), settings.train_steps, settings.batch,
                                       settings.learning_rate, config.corpus.seed)  # fmt: skip
    torch.save(predictor.state_dict(), out / "aesthetic.pth")
    (out / "aesthetic.json").write_text(json.dumps(predictor.config))
    metrics = {"rows": len(scores), "mean_absolute_error": error, "score_std": float(np.std(scores))}
    write_json(out / "metrics.json", metrics)
    log.info("aesthetic_train: %s", metrics)
    return lambda: tracking.log_run(scale, stage=args.out.name, params={"aesthetic": settings.model_dump()}, tags={"kind": "aesthetic_train"},
                                    metrics=metrics)  # fmt: skip
