"""featnet: the evaluation feature network and the reference statistics of the real eval images."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import save_file

from ..data.corpus import NUM_CLASSES
from ..data.shards import to_tensor
from ..device import runtime
from ..evaluation import extract, gaussian_stats, inception_score, load_extractor, train_feature_net
from ..io import write_json

log = logging.getLogger("featnet")


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder")


def load_split(corpus: Path, split: str, resolution: int | None = None) -> tuple[pd.DataFrame, list[Image.Image]]:
    rows = pd.read_parquet(corpus / f"{split}.parquet")
    images = []
    for path in rows["image"]:
        image = Image.open(corpus / path).convert("RGB")
        if resolution and image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BICUBIC)
        images.append(image)
    return rows, images


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
    write_json(out / "extractor.json", {"kind": settings.kind})
    _, real = load_split(args.corpus, "eval", config.download.resolution)
    device = runtime(config.evaluate.precision)
    features, logits = extract(load_extractor(out, device), real, config.evaluate.batch, device)
    save_file({k: v.contiguous() for k, v in gaussian_stats(features).items()}, out / "reference.safetensors")
    summary["real_is"], summary["real_is_std"] = inception_score(logits, config.evaluate.is_splits)
    summary["reference_images"] = len(real)
    write_json(out / "summary.json", summary)
    log.info("featnet: %s", summary)
