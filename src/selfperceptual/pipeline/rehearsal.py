"""The rehearsal scale's inputs: tiny files in the paper scale's real external formats.

    python -m selfperceptual.pipeline.rehearsal data/rehearsal --url-base http://127.0.0.1:8765
    python -m http.server 8765 --bind 127.0.0.1 --directory data/rehearsal/laion-images &
    snakemake --cores all --config scale=rehearsal

writes what params.yaml's ``rehearsal`` block names, each where the paper block's input would be:

- ``laion/metadata.parquet``: LAION-Aesthetics metadata (URL, TEXT, WIDTH, HEIGHT,
  AESTHETIC_SCORE, punsafe, pwatermark, similarity, hash) whose URLs point at ``--url-base``,
  served from ``laion-images/``; sizes and scores lie on both sides of the filter, and a few URLs
  answer 404, as dead LAION links do;
- ``coco/annotations/captions_val2014.json`` and ``coco/val2014/COCO_val2014_*.jpg``: MSCOCO-2014
  val's caption file and image names, five captions per image, annotations in id order
  interleaving images, images not square;
- ``sd21-base/``: stabilityai/stable-diffusion-2-1-base's component layout (CLIP BPE tokenizer
  files, CLIPTextModel, AutoencoderKL with four levels, UNet2DConditionModel with SD 2.1's block
  types and linear projections, PNDM scheduler with SD 2.1's epsilon config) at a tiny size;
- ``authors/mse`` and ``authors/sp``: the same layout standing in for the authors' released
  checkpoints;
- ``inception/weights-inception-2015-12-05-6726825d.pth``: torch-fidelity's Inception-v3 state
  dict with random Kaiming-initialised weights (PyTorch's default init gives degenerate features),
  batch norms calibrated on rendered scenes (``write_inception_weights``);
- ``clip/``: openai/clip-vit-large-patch14's folder layout with a tiny random CLIP model, for the
  CLIP score of text alignment;
- ``aesthetic/sac+logos+ava1-l14-linearMSE.pth``: the LAION aesthetic predictor's state dict with
  random weights, over the tiny CLIP's embeddings;
- ``lpips/vgg16-397923af.pth``: torchvision's VGG16 state dict (its convolutional ``features``,
  all LPIPS reads) with torchvision's random initialisation, for Cas-DM's LPIPS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data.corpus import random_scene, render
from .io import atomic_dir
from ..method.models import SD21_BASE_UNET, SD21_TEXT_TOKENS, caption_words

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's upstream name
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"  # the LAION predictor's upstream name
TINY_WIDTH = 32  # text width = cross-attention width of the tiny SD 2.1 layout


def write_laion(out: Path, url_base: str, num_rows: int, rng: np.random.Generator) -> None:
    """The metadata parquet and the images its URLs name (``laion-images/``, to be served)."""
    images = out / "laion-images"
    images.mkdir(parents=True)
    rows = []
    for index in range(num_rows):
        scene = random_scene(rng)
        width, height = (int(v) for v in rng.integers(40, 160, size=2))
        aesthetic = float(np.round(rng.uniform(5.0, 8.0), 3))
        name = f"{index:06d}.jpg"
        if rng.random() > 0.03:  # the rest answer 404
            render(scene, width, height, aesthetic, rng).save(images / name, quality=95)
        rows.append({
            "URL": f"{url_base.rstrip('/')}/{name}", "TEXT": scene.caption, "WIDTH": width, "HEIGHT": height,
            "similarity": float(np.round(rng.uniform(0.25, 0.4), 4)), "hash": int(rng.integers(-(2**62), 2**62)),
            "punsafe": float(np.round(rng.beta(1, 20), 4)), "pwatermark": float(np.round(rng.beta(1, 8), 4)),
            "AESTHETIC_SCORE": aesthetic,
        })
    (out / "laion").mkdir()
    pd.DataFrame(rows).to_parquet(out / "laion" / "metadata.parquet", index=False)


def write_coco(out: Path, num_images: int, rng: np.random.Generator) -> None:
    """captions_val2014.json (info, licenses, images, annotations) and its val2014/ images."""
    folder = out / "coco" / "val2014"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = int(rng.integers(1, 600_000))
        while any(image["id"] == image_id for image in images):
            image_id = int(rng.integers(1, 600_000))
        width, height = (96, 72) if index % 2 else (72, 96)
        name = f"COCO_val2014_{image_id:012d}.jpg"
        scene = random_scene(rng)
        render(scene, width, height, 7.0, rng).save(folder / name, quality=95)
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
                       "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        annotations += [{"image_id": image_id, "id": 0, "caption": f"{phrase}{scene.caption}."}
                        for phrase in ("", "A photo of ", "There is ", "An image with ", "Here is ")]
    order = rng.permutation(len(annotations))  # the real file interleaves the images' captions
    annotations = [dict(annotations[i], id=int(i) + 1) for i in order]
    document = {"info": {"description": "COCO 2014 Dataset (rehearsal stand-in)", "year": 2014}, "images": images,
                "licenses": [{"url": "", "id": 1, "name": "stand-in"}], "annotations": annotations}
    (out / "coco" / "annotations").mkdir()
    (out / "coco" / "annotations" / "captions_val2014.json").write_text(json.dumps(document))


def bpe_files(captions: list[str], num_merges: int) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt of a CLIP byte-level BPE learnt on ``captions``: CLIP's 512 byte
    tokens (with and without ``</w>``), the merges, then the two special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    words = Counter(word for caption in captions for word in caption_words(caption))
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, parts in pieces.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if tuple(parts[i : i + 2]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    tokens = [*alphabet, *(t + "</w>" for t in alphabet), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, [f"{a} {b}" for a, b in merges]


def write_clip_tokenizer(folder: Path, captions: list[str]):
    """CLIP's tokenizer files (a BPE learnt on ``captions``) in ``folder``; returns the tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_files(captions, num_merges=200)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": SD21_TEXT_TOKENS, "do_lower_case": True, "errors": "replace", **specials}
    ))
    return CLIPTokenizer.from_pretrained(folder)


def write_sd21_layout(folder: Path, captions: list[str], resolution: int, seed: int) -> None:
    """A pipeline folder with SD 2.1-base's components, files and configs, at a tiny size."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_clip_tokenizer(folder / "tokenizer", captions)
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=4 * TINY_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=SD21_TEXT_TOKENS, hidden_act="gelu", projection_dim=TINY_WIDTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).save_pretrained(folder / "text_encoder", safe_serialization=True)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=resolution, scaling_factor=0.18215,
    ).save_pretrained(folder / "vae", safe_serialization=True)
    UNet2DConditionModel(**{
        **SD21_BASE_UNET, "sample_size": resolution // 8, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1,
        "attention_head_dim": (2, 4, 4, 4), "cross_attention_dim": TINY_WIDTH, "norm_num_groups": 8,
    }).save_pretrained(folder / "unet", safe_serialization=True)
    PNDMScheduler(  # SD 2.1-base's own scheduler config: epsilon, not zero-SNR (stages must replace it)
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def write_clip(folder: Path, seed: int) -> None:
    """openai/clip-vit-large-patch14's folder layout (CLIPModel, OpenAI CLIP's tokenizer files, CLIP's
    image preprocessing at 224 pixels, patches of 14) with a tiny random model: the code paths of the
    CLIP score and of clip-retrieval, which tokenizes with OpenAI's vocabulary itself."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .tinyclip import write_tokenizer

    tokenizer = write_tokenizer(folder)
    torch.manual_seed(seed)
    layers = {"hidden_size": TINY_WIDTH, "intermediate_size": 4 * TINY_WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(
        text_config={**layers, "vocab_size": len(tokenizer), "max_position_embeddings": SD21_TEXT_TOKENS, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={**layers, "image_size": 224, "patch_size": 14}, projection_dim=TINY_WIDTH,
    )).save_pretrained(folder, safe_serialization=True)  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def write_inception_weights(path: Path, seed: int) -> None:
    """torch-fidelity's Inception-v3 state dict (its file format: a pickled dict of tensors) with
    Kaiming-normal weights and zero biases. Batch-norm statistics are then measured on 64 rendered
    scenes and the final layer scaled to logits of standard deviation 2 across them: without that,
    a deep random network maps every image to nearly the same features (IS 1.0)."""
    from .evaluation import inception_v3

    path.parent.mkdir(parents=True, exist_ok=True)
    network = inception_v3(["logits_unbiased"])  # the architecture, no weights loaded
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu" if isinstance(module, nn.Conv2d) else "linear", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
            module.train()
    rng = np.random.default_rng(seed)
    scenes = np.stack([np.asarray(render(random_scene(rng), 64, 64, 7.0, rng)) for _ in range(64)])
    with torch.no_grad():
        logits = network(torch.from_numpy(scenes).permute(0, 3, 1, 2).contiguous())[0]
        network.fc.weight *= 2.0 / logits.std(0).mean()
    torch.save(nn.Module.state_dict(network.eval()), path)


def write_aesthetic_weights(path: Path, input_dim: int, seed: int) -> None:
    """The LAION aesthetic predictor's weights file (a state dict) with random weights, for a CLIP
    ``input_dim`` wide."""
    from .aesthetics import AestheticPredictor

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticPredictor(input_dim).state_dict(), path)


def write_vgg_weights(path: Path, seed: int) -> None:
    """torchvision's VGG16 weights file format, the convolutional part only, randomly initialised."""
    from torchvision.models import vgg16

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{key}": value for key, value in vgg16().features.state_dict().items()}, path)


def write_inputs(out: Path, url_base: str, num_laion_rows: int = 600, num_coco_images: int = 40, resolution: int = 64, seed: int = 0) -> None:
    """Every rehearsal input under ``out`` (written atomically: a crash leaves nothing)."""
    with atomic_dir(out) as folder:
        rng = np.random.default_rng(seed)
        write_laion(folder, url_base, num_laion_rows, rng)
        write_coco(folder, num_coco_images, rng)
        captions = pd.read_parquet(folder / "laion" / "metadata.parquet")["TEXT"].tolist()
        for offset, name in enumerate(("sd21-base", "authors/mse", "authors/sp")):
            write_sd21_layout(folder / name, captions, resolution, seed + offset)
        write_inception_weights(folder / "inception" / INCEPTION_FILE, seed)
        write_clip(folder / "clip", seed)
        write_aesthetic_weights(folder / "aesthetic" / AESTHETIC_FILE, TINY_WIDTH, seed)
        write_vgg_weights(folder / "lpips" / "vgg16-397923af.pth", seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (params.yaml's rehearsal block reads data/rehearsal)")
    parser.add_argument("--url-base", default="http://127.0.0.1:8765", help="where laion-images/ will be served")
    args = parser.parse_args(argv)
    write_inputs(args.out, args.url_base)
    url = urlsplit(args.url_base)
    print(f"wrote {args.out}; serve its images with:\n"
          f"  python -m http.server {url.port or 80} --bind {url.hostname} --directory {args.out / 'laion-images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
