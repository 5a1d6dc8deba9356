"""base: the Stable-Diffusion-shaped starting model, saved as a diffusers pipeline folder.

With ``base.pretrained`` set (paper: stabilityai/stable-diffusion-2-1-base) it loads that model by
path or hub id; otherwise it builds the tiny model: a word-level tokenizer over the corpus, a
random CLIPTextModel, an AutoencoderKL trained briefly on the downloaded images, and a random
UNet2DConditionModel. Either way the scheduler is replaced by the paper's DDIM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.shards import iter_samples, to_tensor
from ...method.device import runtime
from ..io import write_json
from ...method.models import (
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    ddim_scheduler,
    load_pipeline,
)

log = logging.getLogger("base")
PARAMS = ("base", "schedule", "download.resolution")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--images", type=Path, action="append", default=[],
        help="a download stage's folder (repeat for each part); the tiny model needs them, base.pretrained does not",
    )


def train_vae(vae, images: torch.Tensor, settings, seed: int) -> list[tuple[int, float]]:
    """Reconstruction (L1 + MSE) plus a small KL term on random crops, in fp32 on the stage's
    device (random draws on the CPU, so the result is the same on any device up to float
    rounding); returns the loss curve and leaves ``vae`` on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    device = runtime("fp32").device
    vae.to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings.learning_rate)
    crop, side = min(settings.train_crop, images.shape[-1]), images.shape[-1]
    curve = []
    for step in tqdm(range(settings.train_steps), desc="vae", mininterval=5):
        top, left = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=generator))
        batch = images[torch.randint(0, len(images), (settings.batch,), generator=generator)]
        batch = batch[..., top : top + crop, left : left + crop].to(device)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        recon = vae.decode(latents).sample
        loss = (recon - batch).abs().mean() + ((recon - batch) ** 2).mean() + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == settings.train_steps - 1:
            curve.append((step, loss.item()))
    vae.cpu()
    return curve


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the latents, as LDM chose SD's 0.18215: unit-variance latents for diffusion."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images[:512].split(64)])
    return float(1.0 / means.std())


def build_tiny(settings, resolution: int, images_dirs: list[Path]) -> dict:
    samples = list(iter_samples(images_dirs))
    if not samples:
        raise SystemExit(f"base: base.pretrained is null, so the tiny model trains its VAE on --images, and there are none in {images_dirs}")
    captions = [caption for _, _, caption in samples]
    images = to_tensor([image for _, image, _ in samples])
    tokenizer = build_tokenizer(captions, settings.text.max_length)
    text_encoder = build_text_encoder(tokenizer, settings.text, settings.seed)
    vae = build_vae(settings.vae, resolution, settings.seed)
    curve = train_vae(vae, images, settings.vae, settings.seed)
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images))
    latent_size = resolution // 2 ** (len(settings.vae.block_out_channels) - 1)
    unet = build_unet(settings.unet, latent_size, settings.vae.latent_channels, settings.text.hidden_size, settings.seed)
    return {
        "components": (vae, text_encoder, tokenizer, unet),
        "summary": {
            "vocab_size": len(tokenizer),
            "vae_final_loss": curve[-1][1] if curve else None,
            "scaling_factor": vae.config.scaling_factor,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "latent_size": latent_size,
        },
    }


def check_pipeline_folder(path: str) -> None:
    """A local ``base.pretrained`` folder holds model_index.json and every component it names."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id, found in the Hugging Face cache
    index = folder / "model_index.json"
    if not index.is_file():
        raise SystemExit(f"base.pretrained: {folder}: no model_index.json; is it a diffusers pipeline folder "
                         "(hf download stabilityai/stable-diffusion-2-1-base --local-dir ...)?")  # fmt: skip
    try:
        named = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"base.pretrained: {index}: not valid JSON ({error.msg}, line {error.lineno})") from None
    components = [name for name, value in named.items() if not name.startswith("_") and isinstance(value, list) and value[0]]
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        raise SystemExit(f"base.pretrained: {folder}: model_index.json names {', '.join(f'{name}/' for name in missing)}, "
                         "which the folder lacks (an incomplete download?)")  # fmt: skip


def run(args, config, scale, out) -> None:
    if config.base.pretrained:
        log.info("base: loading %s", config.base.pretrained)
        check_pipeline_folder(config.base.pretrained)
        try:
            source = load_pipeline(config.base.pretrained)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())
            raise SystemExit(f"base.pretrained: cannot load {config.base.pretrained!r}: {reason}") from error
        components = (source.vae, source.text_encoder, source.tokenizer, source.unet)
        summary = {"pretrained": config.base.pretrained}
    else:
        built = build_tiny(config.base, config.download.resolution, args.images)
        components, summary = built["components"], built["summary"]
    pipeline = assemble_pipeline(*components, scheduler=ddim_scheduler(config.schedule))
    pipeline.save_pretrained(out / "pipeline", safe_serialization=True)
    write_json(out / "summary.json", summary)
    log.info("base: %s", summary)
