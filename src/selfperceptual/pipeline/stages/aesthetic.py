"""aesthetic: each downloaded image's aesthetic score measured anew, with the LAION predictor over
its clip-retrieval image embedding, and the filter's threshold re-applied to it: ``scores.parquet``
(each sample's score in the corpus metadata and the measured one) and ``stats.json`` (how many the
threshold removes, and how well the two scores agree). It counts; the training set stays what the
filter and download kept."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import tracking
from ..aesthetics import AestheticPredictor
from ..data.embeddings import read_embeddings
from ..io import write_json

log = logging.getLogger("aesthetic")
PARAMS = ("aesthetic", "filter.min_aesthetic")


def add_arguments(parser) -> None:
    parser.add_argument("--embeddings", type=Path, required=True, help="the clip_embed stage's folder")
    parser.add_argument("--predictor", type=Path, help="the aesthetic_train stage's folder (when aesthetic.weights is null)")


def load_predictor(config, folder: Path | None) -> AestheticPredictor:
    if config.aesthetic.weights is not None:
        return AestheticPredictor.load(config.aesthetic.weights, tuple(config.aesthetic.hidden), config.aesthetic.weights_sha256)
    if folder is None or not (folder / "aesthetic.pth").is_file():
        raise SystemExit(f"--predictor {folder}: no aesthetic.pth; aesthetic.weights is null, so the aesthetic_train stage's predictor is needed")
    predictor = AestheticPredictor(**json.loads((folder / "aesthetic.json").read_text()))
    predictor.load_state_dict(torch.load(folder / "aesthetic.pth", map_location="cpu", weights_only=True))
    return predictor.eval()


def run(args, config, scale, out):
    images, _, metadata = read_embeddings(args.embeddings)
    predictor = load_predictor(config, args.predictor)
    if images.shape[1] != predictor.config["input_dim"]:
        raise SystemExit(f"aesthetic: the embeddings are {images.shape[1]} wide, the predictor takes {predictor.config['input_dim']}; "
                         "score with the CLIP it was made for")  # fmt: skip
    with torch.no_grad():
        measured = predictor(torch.from_numpy(images.astype(np.float32))).numpy()
    threshold = config.filter.min_aesthetic
    scores = metadata.reindex(columns=["key", "caption", "AESTHETIC_SCORE"]).rename(columns={"AESTHETIC_SCORE": "corpus_score"})
    scores["measured_score"], scores["kept"] = measured, measured > threshold
    scores.to_parquet(out / "scores.parquet", index=False)
    stats = {"samples": len(scores), "threshold": threshold, "removed": int((~scores["kept"]).sum()), "kept": int(scores["kept"].sum()),
             "measured_mean": float(measured.mean()), "corpus_mean": float(scores["corpus_score"].mean())}  # fmt: skip
    if scores["corpus_score"].notna().all() and len(scores) > 1:
        stats["correlation"] = float(np.corrcoef(scores["corpus_score"], measured)[0, 1])
    write_json(out / "stats.json", stats)
    log.info("aesthetic: %s", stats)
    return lambda: tracking.log_run(scale, stage=args.out.name, params={"aesthetic": config.aesthetic.model_dump(), "threshold": threshold},
                                    tags={"kind": "aesthetic"}, metrics={k: v for k, v in stats.items() if isinstance(v, int | float)})  # fmt: skip
