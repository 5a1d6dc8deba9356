"""GPU-hours of each paper-scale stage, and the SLURM time limits that follow from them.

    python -m selfperceptual.pipeline.cost                       # A100, 30% of its bf16 peak (the defaults)
    python -m selfperceptual.pipeline.cost --gpu h100 --utilization 0.35
    python -m selfperceptual.pipeline.cost --measured-images-per-s 41.5 --measured-on "H100 SXM, 2026-12-01"

The work of each stage is counted, not guessed: PyTorch's FlopCounterMode runs SD 2.1-base's real
architectures (UNet, VAE encoder and decoder, CLIP text encoder, the frozen network f*_l of each SP
variant) on the meta device, so no weights are needed, and counts every matmul and convolution of
a forward pass and, for training, of the backward pass (weight gradients of the online UNet, input
gradients only through the frozen f*). Time is work over the GPU's dense bf16 peak times a stated
utilisation, or, for training, the throughput you measured (``benchmarks/sp_step.py --shape sd21
--device cuda --dtype bfloat16`` prints images/s for the MSE step; SP steps are scaled from it by
their FLOP ratio). Each command's time limit in params.yaml's paper resources is its slowest job
times the margin, rounded up to the hour.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..method import objectives
from .config import apply_settings, load_params
from .dag import build_stages

PEAK_BF16_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}  # dense, SXM parts
MARGIN = 1.5
MIN_LIMIT_MIN = 60


@dataclass(frozen=True)
class Job:
    stage: str
    command: str
    gpus: int
    gpu_hours: float  # of the whole stage (all its jobs)
    jobs: int
    note: str

    @property
    def hours_per_job(self) -> float:
        return self.gpu_hours / self.jobs / max(self.gpus, 1)


def count_flops(run) -> float:
    """FLOPs of running ``run()``: every matmul and convolution, forward and backward (PyTorch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


@cache
def network_flops(resolution: int, layer: str = "midblock") -> dict[str, float]:
    """FLOPs per image of SD 2.1-base's networks at ``resolution`` px, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torchvision.models import inception_v3, vgg16
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..method.models import SD21_BASE_UNET, SD21_TEXT_TOKENS
    from ..method.unet import PerceptualNetwork

    side = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SD21_BASE_UNET, "sample_size": side})
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=resolution,
        )
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, max_position_embeddings=SD21_TEXT_TOKENS, hidden_act="gelu"))
        perceptual = PerceptualNetwork.frozen_copy(unet, layer)
        latents, image = torch.randn(1, 4, side, side), torch.randn(1, 3, resolution, resolution)
        context, t = torch.randn(1, SD21_TEXT_TOKENS, 1024), torch.tensor([500])
        tokens = torch.zeros(1, SD21_TEXT_TOKENS, dtype=torch.long)
        inception = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()  # torch-fidelity's architecture
        vgg = vgg16(weights=None).features.requires_grad_(False)  # Cas-DM's LPIPS backbone
        vae.requires_grad_(False)

    def online_step():
        unet(latents, t, encoder_hidden_states=context).sample.sum().backward()

    def frozen_branch():  # the predicted branch: forward, then gradients to its input only
        x = latents.clone().requires_grad_(True)
        sum(feature.sum() for feature in perceptual.features(x, t, context)).backward()

    def decode_branch():  # the decoder on a prediction: forward, then gradients to its input only
        vae.decode(latents.clone().requires_grad_(True)).sample.sum().backward()

    def vgg_branch():
        vgg(image.clone().requires_grad_(True)).sum().backward()

    return {
        "decode_branch": count_flops(decode_branch),
        "vgg_forward": count_flops(lambda: vgg(image)),
        "vgg_branch": count_flops(vgg_branch),
        "unet_forward": count_flops(lambda: unet(latents, t, encoder_hidden_states=context)),
        "unet_train": count_flops(online_step),
        "frozen_forward": count_flops(lambda: perceptual.features(latents, t, context)),
        "frozen_branch": count_flops(frozen_branch),
        "vae_encode": count_flops(lambda: vae.encode(image)),
        "vae_decode": count_flops(lambda: vae.decode(latents)),
        "text": count_flops(lambda: text(tokens)),
        "inception": count_flops(lambda: inception(torch.randn(1, 3, 299, 299, device="meta"))),
    }


def train_flops_per_image(resolution: int, objective: str, settings, num_train_timesteps: int = 1000) -> float:
    """One training sample of ``objective`` with ``settings`` (its ``train.<name>`` section), as the
    objective counts it from its networks' FLOPs (method.objectives: each one's flops_per_image)."""
    counts = lambda layer="midblock": network_flops(resolution, layer)  # noqa: E731 - f* truncated at SP's layer
    return objectives.get(objective).flops_per_image(counts, settings, num_train_timesteps)


def estimate(config, peak_tflops: float, utilization: float, kept_rows: int, measured_images_per_s: float | None) -> list[Job]:
    """GPU-hours of every GPU stage of the DAG ``config`` describes."""
    resolution = config.download.resolution
    rate = peak_tflops * 1e12 * utilization  # FLOP/s of one GPU
    counts = network_flops(resolution)
    mse_step = train_flops_per_image(resolution, "mse", config.train.objective("mse"))
    jobs = []
    stages = build_stages(config)
    for stage in stages:
        resources = config.resources.of(stage.command)
        if stage.command == "train":
            run = stage.spec
            trained = apply_settings(config, run.overrides(config)).train  # an ablation's settings
            objective = trained.objective(run.steps_of or run.objective)  # its step count
            per_image = train_flops_per_image(resolution, run.objective, trained.objective(run.objective), config.schedule.num_train_timesteps)
            images = objective.num_steps * config.train.global_batch
            seconds = images / measured_images_per_s * per_image / mse_step if measured_images_per_s else images * per_image / rate
            note = f"{objective.num_steps} steps x {config.train.global_batch}, {per_image / 1e12:.2f} TFLOP/image"
            jobs.append(Job(stage.name, "train", resources.gpus * resources.nodes, seconds / 3600, 1, note))
        elif stage.command == "sample":
            row = stage.spec
            per_image = row.nfe * counts["unet_forward"] + counts["vae_decode"] + 2 * counts["text"]
            seconds = config.sample.num_images / config.sample.num_jobs * per_image / rate
            jobs.append(Job(stage.name, "sample", resources.gpus, seconds / 3600, 1,
                            f"{config.sample.num_images // config.sample.num_jobs:,} images x {row.nfe} UNet passes"))
        elif stage.command == "encode":
            per_image = counts["vae_encode"] + counts["text"]
            seconds = kept_rows / config.encode.num_jobs * per_image / rate
            jobs.append(Job(stage.name, "encode", resources.gpus, seconds / 3600, 1, f"{kept_rows // config.encode.num_jobs:,} images"))
        elif stage.command in ("featnet", "evaluate"):
            images = config.corpus.num_eval_captions if stage.command == "featnet" else config.sample.num_images
            seconds = images * counts["inception"] / rate
            jobs.append(Job(stage.name, stage.command, resources.gpus, seconds / 3600, 1, f"Inception-v3 on {images:,} images"))
    return jobs


def grouped(jobs: list[Job]) -> list[Job]:
    """One line per training stage; the parts of a split stage, and all sampling and evaluation
    rows (ours, then the authors' checkpoints'), summed into one line each."""
    def key(job: Job) -> str:
        if job.command in ("sample", "evaluate"):
            rows = "the authors' checkpoints" if "authors_" in job.stage else "our models"
            return f"{job.command}, {rows}"
        return re.sub(r"_part\d+$", "", job.stage)

    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return [
        Job(name, members[0].command, members[0].gpus, sum(j.gpu_hours for j in members), len(members),
            members[0].note if len({j.note for j in members}) == 1 else "; ".join(sorted({j.note for j in members})))
        for name, members in groups.items()
    ]


def time_limits(jobs: list[Job], margin: float = MARGIN) -> dict[str, int]:
    """runtime_min per stage command: its slowest job times ``margin``, rounded up to the hour."""
    limits = {}
    for job in jobs:
        minutes = max(MIN_LIMIT_MIN, math.ceil(job.hours_per_job * margin) * 60)
        limits[job.command] = max(limits.get(job.command, 0), minutes)
    return limits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--scale", default="paper")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default="a100")
    parser.add_argument("--utilization", type=float, default=0.3, help="fraction of the dense bf16 peak reached (default 0.3)")
    parser.add_argument("--kept-rows", type=int, default=3_000_000,
                        help="images encode sees: LAION-Aesthetics 6+ rows over 512 px that download (default 3M, an assumption)")
    parser.add_argument("--measured-images-per-s", type=float, help="training throughput of one GPU in the MSE step, measured")
    parser.add_argument("--measured-on", default="", help="the GPU and date of that measurement")
    args = parser.parse_args(argv)
    _, config = load_params(args.params, args.scale)
    jobs = estimate(config, PEAK_BF16_TFLOPS[args.gpu], args.utilization, args.kept_rows, args.measured_images_per_s)
    basis = (f"measured {args.measured_images_per_s} images/s per GPU ({args.measured_on or 'GPU and date not given'})"
             if args.measured_images_per_s else f"FLOP count at {args.utilization:.0%} of the {args.gpu.upper()}'s {PEAK_BF16_TFLOPS[args.gpu]:.0f} TFLOP/s bf16 peak")
    print(f"scale {args.scale}; {basis}; time limits = slowest job x {MARGIN}, rounded up to the hour\n")
    print("| stage | jobs | GPUs per job | hours per job | GPU-hours | work per job |")
    print("|---|---|---|---|---|---|")
    for group in grouped(jobs):
        print(f"| {group.stage} | {group.jobs} | {group.gpus} | {group.hours_per_job:,.2f} | {group.gpu_hours:,.1f} | {group.note} |")
    print(f"| **total** | | | | **{sum(job.gpu_hours for job in jobs):,.0f}** | |\n")
    configured = {command: config.resources.of(command).runtime_min for command in ("encode", "train", "sample", "featnet", "evaluate")}
    for command, minutes in time_limits(jobs).items():
        flag = "" if configured[command] == minutes else f"  (params.yaml has {configured[command]})"
        print(f"resources.{command}.runtime_min: {minutes}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
