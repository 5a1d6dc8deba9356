"""train: fine-tune the UNet with the MSE objective (Eq. 4) or the self-perceptual one (Eq. 11)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import tracking
from ..distributed import launch_command
from ..io import read_json, write_json
from ..models import load_pipeline, load_unet, save_with_unet
from ..sampling import generate, grid
from ..schedule import Schedule
from ..training import LatentData, build_loss, train

log = logging.getLogger("train")
PREVIEW_IMAGES = 8


def add_arguments(parser) -> None:
    parser.add_argument("--data", type=Path, action="append", required=True, help="an encode stage's folder (repeat for each part, in order)")
    parser.add_argument("--init", type=Path, required=True, help="folder whose pipeline/ is the starting model")
    parser.add_argument("--perceptual", type=Path, help="a freeze stage's folder (sp only)")
    parser.add_argument("--objective", choices=("mse", "sp"), required=True)
    parser.add_argument("--conditioning", choices=("text", "uncond"), required=True)


def sp_tags(objective: str, sp, perceptual: Path | None) -> dict:
    """The SP settings a run was trained with, as MLflow tags (what the ablation tables vary)."""
    if objective != "sp":
        return {}
    source = Path(read_json(perceptual / "summary.json")["source"]).name  # the model f* was frozen from
    return {"sp_layer": sp.layer, "sp_t_prime": sp.t_prime, "sp_distance": sp.distance, "sp_formulation": sp.formulation, "perceptual_network": source}


def launcher(argv: list[str], config) -> list[str] | None:
    """``accelerate launch`` over every GPU this job was given (SLURM's --gpus sets what CUDA sees)."""
    return launch_command(argv, torch.cuda.device_count(), config.train.precision)


def run(args, config, scale, out) -> None:
    """``out`` is None on the processes of a multi-GPU launch other than the first: they train, the first writes."""
    schedule = Schedule.from_config(config.schedule)
    loss_fn, objective_config = build_loss(args.objective, config.train, schedule, args.perceptual)
    data = LatentData(args.data)
    unet = load_unet(args.init / "pipeline")
    log.info("train %s/%s: %d steps of %d on %d samples", args.objective, args.conditioning, objective_config.num_steps, config.train.global_batch, len(data))
    ema, history, seconds_per_step = train(
        unet, data, loss_fn, objective_config, config.train, args.conditioning, schedule.num_train_timesteps
    )
    if out is None:
        return
    save_with_unet(args.init / "pipeline", ema, out / "pipeline")

    prompts = data.captions[:PREVIEW_IMAGES] if args.conditioning == "text" else [""] * PREVIEW_IMAGES
    preview = generate(load_pipeline(out / "pipeline"), prompts, list(range(PREVIEW_IMAGES)), steps=25, cfg=None, rescale=None)
    grid([preview]).save(out / "preview.png")

    metrics = {"final_loss": history.series["loss"][-1][1], "seconds_per_step": seconds_per_step}
    write_json(out / "metrics.json", metrics)
    write_json(out / "loss_curve.json", history.series)
    tracking.log_run(
        scale,
        stage=args.out.name,
        params={"objective": args.objective, "conditioning": args.conditioning, "overrides": " ".join(args.overrides), "train": config.train.model_dump(), "schedule": config.schedule.model_dump()},
        tags={"objective": args.objective, "conditioning": args.conditioning, "kind": "train", **sp_tags(args.objective, config.train.sp, args.perceptual)},
        metrics=metrics,
        series=history.series,
        images=[out / "preview.png"],
    )
