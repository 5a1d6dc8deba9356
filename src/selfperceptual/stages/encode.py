"""encode: VAE latent distributions and text embeddings of the training images, cached once.

Latents are stored already multiplied by the VAE's scaling factor (the VAE owns that constant):
``mean`` and ``std`` of the posterior, so training draws x0 = mean + std * n afresh each step,
as training from pixels would. The empty caption's embedding is stored too: condition dropout
and the unconditional variant feed it (what the pipeline's unconditional branch feeds). With
``encode.num_jobs`` > 1 each job encodes a block of whole batches; training reads the parts in order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..data.shards import count_samples, iter_samples, to_tensor
from ..io import write_json
from ..models import encode_prompts, load_pipeline
from ..split import add_part_argument, batch_block, checked_part

log = logging.getLogger("encode")


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=Path, action="append", required=True, help="a download stage's folder (repeat for each part)")
    parser.add_argument("--base", type=Path, required=True, help="the base stage's folder")
    add_part_argument(parser, "the samples (in blocks of encode.batch)")


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def run(args, config, scale, out) -> None:
    pipeline = load_pipeline(args.base / "pipeline")
    vae, tokenizer, text_encoder = pipeline.vae.eval(), pipeline.tokenizer, pipeline.text_encoder.eval()
    factor = vae.config.scaling_factor
    index, count = checked_part(args.part, config.encode.num_jobs, "encode.num_jobs")
    todo = batch_block(count_samples(args.images), config.encode.batch, index, count)
    keys, captions, means, stds, contexts = [], [], [], [], []
    batches = _batches(iter_samples(args.images, todo.start, todo.stop), config.encode.batch)
    for batch in tqdm(batches, desc="encode", total=-(-len(todo) // config.encode.batch), mininterval=5):
        posterior = vae.encode(to_tensor([image for _, image, _ in batch])).latent_dist
        means.append(posterior.mean * factor)
        stds.append(posterior.std * factor)
        texts = [caption for _, _, caption in batch]
        contexts.append(encode_prompts(tokenizer, text_encoder, texts))
        keys.extend(key for key, _, _ in batch)
        captions.extend(texts)
    if not keys:
        raise SystemExit(f"encode: no images for part {index}/{count} in {', '.join(map(str, args.images))}")
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, out / "latents.safetensors")
    save_file(
        {"context": torch.cat(contexts).contiguous(), "empty": encode_prompts(tokenizer, text_encoder, [""]).contiguous()},
        out / "text.safetensors",
    )
    write_json(out / "index.json", {"keys": keys, "captions": captions, "scaling_factor": factor, "part": [index, count], "samples": [todo.start, todo.stop]})
    log.info("encode: %d samples, latents %s", len(keys), tuple(means[0].shape[1:]))
