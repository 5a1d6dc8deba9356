"""Stable-Diffusion-shaped components: tiny ones built offline, or SD 2.1-base loaded by path or id.

Every later stage loads the result with diffusers' ``from_pretrained``, so the tiny default and
the paper's SD 2.1-base go through the same code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from . import objectives
from .device import Runtime
from .errors import InputError, MissingComponent
from .schedule import Schedule
from .unet import finite_weights

# The UNet of stabilityai/stable-diffusion-2-1-base (its unet/config.json), for tests and benchmarks
# of the paper's architecture without its weights.
SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # diffusers reads this as the number of heads: 64 channels each
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
# Its VAE (vae/config.json): the cost of decoding for the peers' benchmarks.
SD21_BASE_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD21_TEXT_TOKENS = 77  # CLIP's context length; the text width is cross_attention_dim

SPECIAL_TOKENS = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def build_tokenizer(captions, max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus vocabulary, CLIP-style (bos ... eos, padded)."""
    words = sorted({word for caption in captions for word in caption_words(caption)})
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    vocab = {token: index for index, token in enumerate(specials + words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^a-z0-9]+"), behavior="removed")
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        **{f"{kind}_token": token for kind, token in SPECIAL_TOKENS.items()},
    )


def build_text_encoder(tokenizer, config, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=4 * config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_vae(config, resolution: int, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=resolution,
    )


def build_unet(config, sample_size: int, latent_channels: int, cross_attention_dim: int, seed: int) -> UNet2DConditionModel:
    """An SD-shaped UNet: cross-attention down blocks then a plain one, mirrored on the way up."""
    torch.manual_seed(seed)
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_heads,  # diffusers reads this as the number of heads
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
    )


def ddim_scheduler(schedule_config) -> DDIMScheduler:
    """The sampler of every table: DDIM with v-prediction, zero terminal SNR and trailing timesteps
    (the paper's), never the epsilon scheduler a loaded SD 2.1-base pipeline brings with it."""
    schedule = Schedule.from_config(schedule_config)
    return DDIMScheduler(
        beta_start=schedule_config.beta_start,
        beta_end=schedule_config.beta_end,
        beta_schedule="scaled_linear",
        **schedule.scheduler_config(),
    )


def assemble_pipeline(vae, text_encoder, tokenizer, model, scheduler, objective: str = "mse") -> StableDiffusionPipeline:
    """A pipeline that samples ``model``, the model ``objective`` trains (a UNet, or Cas-DM's two modules)."""
    return objectives.get(objective).pipeline(model, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def pipeline_class(path: str | Path) -> type[StableDiffusionPipeline]:
    """The pipeline class a saved folder names (its model_index.json): an objective's own, or StableDiffusionPipeline."""
    index = Path(path) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else StableDiffusionPipeline.__name__
    objective = objectives.saving(name)
    if objective is None and name != StableDiffusionPipeline.__name__:
        raise MissingComponent(f"{path} holds a {name}, which no registered objective saves (registered: {', '.join(objectives.names())})")
    return objective.pipeline_type() if objective else StableDiffusionPipeline


def load_pipeline(path: str | Path, runtime: Runtime | None = None) -> StableDiffusionPipeline:
    """A pipeline folder (or hub id), on ``runtime``'s device and dtype when given, else fp32 on the CPU."""
    dtype = runtime.dtype if runtime else torch.float32
    pipeline = pipeline_class(path).from_pretrained(str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False)
    return runtime.place_pipeline(pipeline) if runtime else pipeline


def load_stage_pipeline(input: str, stage_folder: Path, runtime: Runtime | None = None) -> StableDiffusionPipeline:
    """The pipeline in a base or train stage's folder, every component loaded now: a missing or
    broken file stops the stage before any work, naming the input (``input``) and the folder."""
    folder = stage_folder / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise InputError(input, "no pipeline/model_index.json; is this a base or train stage's folder?", stage_folder)
    try:
        pipeline = load_pipeline(folder, runtime)
    except Exception as error:
        reason = " ".join(str(error).split())
        raise InputError(input, f"cannot load the pipeline in {folder}: {reason}", stage_folder) from error
    for name, component in pipeline.components.items():  # a dead model (a diverged training) would give black images and an FID
        if isinstance(component, torch.nn.Module) and not finite_weights(component):
            raise InputError(input, f"the weights of {name} in {folder} are not finite (NaN or inf): was its training diverging?", stage_folder)
    return pipeline


def load_unet(pipeline_dir: str | Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")


def save_trained(source_pipeline_dir: str | Path, model, out_dir: Path, objective: str = "mse") -> None:
    """Writes a pipeline folder: every component of ``source_pipeline_dir`` but those ``objective``
    trains, which come from ``model`` (for Cas-DM both modules: a CasDMPipeline's folder)."""
    trained = {name for each in objectives.registered().values() for name in each.components}
    for item in Path(source_pipeline_dir).iterdir():
        if item.name not in trained:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out_dir / item.name)
    objectives.get(objective).save(model, out_dir)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = (ids != tokenizer.pad_token_id).long() if use_mask else None
    return text_encoder(ids.to(text_encoder.device), attention_mask=mask)[0]
