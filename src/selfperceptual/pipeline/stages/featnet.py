"""featnet: the evaluation feature network, and the features and statistics of the real reference images."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from ..data.corpus import NUM_CLASSES
from ..data.shards import to_tensor
from ...method.device import runtime
from ..evaluation import (
    extract,
    inception_score,
    load_extractor,
    reference_images,
    save_extractor,
    save_reference,
    train_feature_net,
)
from ..io import write_json

log = logging.getLogger("featnet")
PARAMS = ("featnet", "evaluate.batch", "evaluate.precision", "evaluate.is_splits", "corpus.seed", "download.resolution")


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder")


def load_split(corpus: Path, split: str) -> tuple[pd.DataFrame, list[Image.Image]]:
    rows = pd.read_parquet(corpus / f"{split}.parquet")
    return rows, [Image.open(corpus / path).convert("RGB") for path in rows["image"]]


def run(args, config, scale, out) -> None:
    settings = config.featnet
    summary = {"kind": settings.kind}
    if settings.kind == "tiny":
        rows, images = load_split(args.corpus, "featnet")
        network, accuracy = train_feature_net(
            to_tensor(images), torch.tensor(rows["label"].to_numpy()), NUM_CLASSES, settings, config.corpus.seed
        )
        network.save(out)
        summary["train_accuracy"] = round(accuracy, 4)
    save_extractor(out, settings)
    captions = pd.read_parquet(args.corpus / "eval.parquet")
    real = reference_images([str(args.corpus / path) for path in captions["image"]], config.download.resolution)
    device = runtime(config.evaluate.precision)
    features, logits = extract(load_extractor(out, device), real, config.evaluate.batch, device)
    save_reference(features, out / "reference.safetensors")
    summary["real_is"], summary["real_is_std"] = inception_score(logits, config.evaluate.is_splits)
    summary["reference_images"] = len(real)
    write_json(out / "summary.json", summary)
    log.info("featnet: %s", summary)
