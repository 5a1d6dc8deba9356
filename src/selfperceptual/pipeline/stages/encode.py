"""encode: VAE latent distributions and text embeddings of the training images, cached once.

Latents are stored already multiplied by the VAE's scaling factor (the VAE owns that constant):
``mean`` and ``std`` of the posterior, so training draws x0 = mean + std * n afresh each step,
as training from pixels would. The empty caption's embedding is stored too: condition dropout
and the unconditional variant feed it (what the pipeline's unconditional branch feeds). With
``encode.num_jobs`` > 1 each job encodes a block of whole batches; training reads the parts in order.
The output is written a shard of ``encode.shard_size`` samples at a time (``data/latents.py``), so
memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.latents import ShardWriter
from ..data.shards import count_samples, sample_batches, to_tensor
from ...method.device import runtime
from ...method.models import encode_prompts, load_stage_pipeline
from ..split import add_part_argument, batch_block, checked_part

log = logging.getLogger("encode")
PARAMS = ("encode",)


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=Path, action="append", required=True, help="a download stage's folder (repeat for each part)")
    parser.add_argument("--base", type=Path, required=True, help="the base stage's folder")
    add_part_argument(parser, "the samples (in blocks of encode.batch)")


def refuse_non_finite(keys: list[str], *tensors: torch.Tensor, precision: str) -> None:
    """Stops before a sample whose latents or text embedding hold NaN or inf reaches a shard."""
    finite = torch.stack([tensor.isfinite().flatten(1).all(1) for tensor in tensors]).all(0).tolist()
    bad = [key for key, ok in zip(keys, finite) if not ok]
    if bad:
        hint = "; SD's VAE overflows in fp16: set encode.precision to bf16 or fp32" if precision == "fp16" else ""
        raise SystemExit(f"encode: the latents or text embeddings of {len(bad)} image(s) are not finite (NaN or inf), "
                         f"e.g. {bad[0]!r}; nothing was written{hint}")


@torch.no_grad()
def run(args, config, scale, out) -> None:
    device = runtime(config.encode.precision)
    pipeline = load_stage_pipeline("base", args.base, device)
    vae, tokenizer, text_encoder = pipeline.vae, pipeline.tokenizer, pipeline.text_encoder
    factor = vae.config.scaling_factor
    index, count = checked_part(args.part, config.encode.num_jobs, "encode.num_jobs")
    todo = batch_block(count_samples(args.images), config.encode.batch, index, count)
    log.info("encode: samples %d-%d on %s, shards of %d", todo.start, todo.stop, device.describe(), config.encode.shard_size)
    writer = ShardWriter(out, config.encode.shard_size)
    batches = sample_batches(args.images, config.encode.batch, todo.start, todo.stop)  # the next batch decodes meanwhile
    for batch in tqdm(batches, desc="encode", total=-(-len(todo) // config.encode.batch), mininterval=5):
        posterior = vae.encode(device.tensor(to_tensor([image for _, image, _ in batch]))).latent_dist
        texts, keys = [caption for _, _, caption in batch], [key for key, _, _ in batch]
        context = encode_prompts(tokenizer, text_encoder, texts)
        mean, std = posterior.mean * factor, posterior.std * factor
        refuse_non_finite(keys, mean, std, context, precision=config.encode.precision)
        writer.add(mean, std, context, keys, texts)
    if not writer.shards and not writer.pending:
        raise SystemExit(f"encode: no images for part {index}/{count} in {', '.join(map(str, args.images))}")
    total = writer.close(
        encode_prompts(tokenizer, text_encoder, [""]),
        scaling_factor=factor, part=[index, count], samples=[todo.start, todo.stop], precision=config.encode.precision,
    )
    log.info("encode: %d samples in %d shards", total, len(writer.shards))
