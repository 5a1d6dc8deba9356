"""evaluate: FID (with a bootstrap interval), Inception Score, precision/recall and text alignment of
one sampling row against the real reference images; keeps for the report's paired intervals each
image's features and alignment, and FID on each bootstrap resample (``intervals.draws``).

Text alignment of the text-conditioned rows: with ``evaluate.clip`` (the rehearsal and paper
scales), CLIP score, 100 times the cosine of the image's and the caption's CLIP embeddings, with
the CLIP model it names; without (the synthetic corpus), the fraction of samples that the
evaluation classifier labels with their caption's shape and colour (the corpus's ``eval.parquet``
holds each caption's label). Beside it, ``clip_score``: the CLIP score with the data stages' CLIP
(``clip.model``, or the clip stage's tiny CLIP, ``--clip``), whose embeddings clip-retrieval made of
the training set; where that CLIP is ``evaluate.clip``'s, the alignment already is that score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .. import tracking
from ...method.device import runtime
from ..evaluation import FrechetToReference, check_featnet, clip_scores, extract, load_extractor, metrics
from ..experiments import TRAIN_RUNS, peer_tags, row_named, train_run_named, unseeded
from ..io import decode_images, write_json
from ..sheets import sheet
from ..data.samples import sample_images

log = logging.getLogger("evaluate")
PARAMS = ("evaluate", "sample", "clip.model")
GRID_IMAGES = 16


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=Path, action="append", required=True, help="a sample stage's folder (repeat for each part)")
    parser.add_argument("--featnet", type=Path, required=True, help="the featnet stage's folder")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder (each eval caption's label)")
    parser.add_argument("--clip", type=Path, help="the clip stage's folder (the tiny CLIP, when clip.model is null)")


def caption_labels(corpus: Path) -> dict[str, int]:
    """Eval caption -> its (shape, colour) label; empty where the corpus has none (COCO)."""
    rows = pd.read_parquet(corpus / "eval.parquet", columns=["caption", "label"])
    return {} if (rows["label"] < 0).any() else dict(zip(rows["caption"], rows["label"].astype(int), strict=True))


def recognised(logits: torch.Tensor, prompts: list[str], labels: dict[str, int]) -> torch.Tensor | None:
    """1 where the classifier's label of a sample is its caption's, else 0; None without labels or prompts."""
    if not labels or not all(prompts):
        return None
    missing = sorted({prompt for prompt in prompts if prompt not in labels})
    if missing:
        raise SystemExit(f"evaluate: {len(missing)} prompts are not eval captions of the corpus, e.g. {missing[0]!r}")
    return (logits.argmax(1) == torch.tensor([labels[prompt] for prompt in prompts])).float()


def run_tags(row, sampled: dict, stage: str) -> dict:
    """The evaluation run's tags: what to filter and compare by."""
    trained = row.model in TRAIN_RUNS or unseeded(row.model)[0] in TRAIN_RUNS
    return {
        "kind": "evaluate",
        "row": row.name,
        "row_without_seed": unseeded(row.name)[0],  # the runs of one row over training seeds share it
        "training_seed": unseeded(row.name)[1],
        "tables": " ".join(row.tables),  # filter with tags.tables LIKE '%table3%'
        "model": row.model,
        "ablation": train_run_named(row.model).ablation if trained else "none",
        "objective": row.objective,
        "conditioning": row.conditioning,
        "cfg": row.cfg if row.cfg is not None else "none",
        "rescale": row.rescale if row.rescale is not None else "none",
        "steps": row.steps,
        "nfe": row.nfe,
        "model_run_id": sampled.get("model_run_id") or "none",  # the training run of the sampled model
        **peer_tags(stage),
    }


def run(args, config, scale, out) -> None:
    check_featnet(args.featnet)
    sampled, paths = sample_images(args.samples)
    row = row_named(sampled["row"])
    params = {"row": row.name, "model": row.model, "sample": config.sample.model_dump(), "evaluate": config.evaluate.model_dump(), "steps": sampled["steps"]}
    live = tracking.LiveRun(scale, args.out.name, params, run_tags(row, sampled, args.out.name), system_metrics=False,
                            model_id=sampled.get("model_id"))  # RUNNING while it works; its metrics are also its model's  # fmt: skip
    try:
        scores = evaluate(args, config, row, sampled, paths, out)
    except BaseException:
        live.end("FAILED")
        raise
    if live.run_id:  # the report links each row to this run
        write_json(out / "tracking.json", {"run_id": live.run_id, "experiment_id": live.experiment_id, "tracking_uri": tracking.tracking_uri()})
    log.info("evaluate %s: %s", row.name, ", ".join(f"{key} {value:.4g}" for key, value in scores.items()))

    def report() -> None:
        live.end("FINISHED", metrics=scores, images={"samples": (args.out / "samples.png", 0)})  # one key in every evaluation run: compared side by side
        live.raise_if_failed()

    return report


def evaluate(args, config, row, sampled: dict, paths: list[Path], out: Path) -> dict[str, float]:
    """Writes the evaluation's files into ``out``; returns its scores."""
    images = decode_images(paths)
    device = runtime(config.evaluate.precision)
    features, logits = extract(load_extractor(args.featnet, device), images, config.evaluate.batch, device)
    reference = load_file(args.featnet / "reference.safetensors")
    scores = {**metrics(features, logits, reference, config.evaluate.is_splits), "num_images": len(images)}
    kept = {"features": features.float().contiguous()}  # per image: the report's layout distances
    if config.evaluate.bootstrap:
        frechet = FrechetToReference(reference["mu"], reference["sigma"], reference.get("sigma_root"), device.device)
        fid = frechet.resampled(features, config.evaluate.bootstrap)
        scores["fid_low"], scores["fid_high"] = fid.interval()
        kept |= {"fid_resamples": torch.from_numpy(fid.distribution), "fid_all": torch.tensor([fid.estimate], dtype=torch.float64)}
    prompts = sampled["prompts"][: len(images)]
    if config.evaluate.clip and all(prompts):
        alignment = clip_scores(config.evaluate.clip, images, prompts, config.evaluate.batch, device)
    else:
        alignment = recognised(logits, prompts, caption_labels(args.corpus))
    if alignment is not None:
        scores["alignment"] = float(alignment.mean())  # the mean of the values the claims resample (no floor at 0)
        kept["alignment"] = alignment.float()
    data_clip = config.clip.model or (args.clip / "model" if args.clip else None)
    alignment_is_it = bool(config.evaluate.clip) and config.evaluate.clip == config.clip.model  # the same CLIP: already computed
    if data_clip and all(prompts) and not alignment_is_it:
        scores["clip_score"] = float(clip_scores(str(data_clip), images, prompts, config.evaluate.batch, device).mean())
    save_file(kept, out / "features.safetensors")  # the report's paired intervals: FID's resamples, alignment and layout per image
    write_json(out / "metrics.json", {"row": row.name, **scores})
    guidance = "no CFG" if row.cfg is None else f"CFG {row.cfg:g}" + ("" if row.rescale is None else f", rescale {row.rescale:g}")
    shown = min(GRID_IMAGES, len(images))
    captions = [f"seed {sampled['seeds'][i]}: {prompts[i] or '(empty prompt)'}" for i in range(shown)]
    title = f"{row.name}: {row.model}, {row.steps} DDIM steps, {guidance}; the first {len(captions)} of {len(images)} samples"
    sheet(images[:shown], captions, title).save(out / "samples.png")
    return scores
