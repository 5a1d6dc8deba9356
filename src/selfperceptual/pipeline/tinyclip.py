"""A tiny CLIP for the small scales, where no CLIP weights exist.

transformers' ``CLIPModel`` at a small size, with OpenAI CLIP's own tokenizer: the BPE vocabulary of
clip-anytorch (the ``clip`` package clip-retrieval tokenizes with), 49,408 tokens and a context of
77, so ``clip.tokenize`` in clip-retrieval's environment and ``CLIPTokenizer`` here give the same
ids. It is trained contrastively (InfoNCE both ways, learnt temperature) on the downloaded images
and their captions, and saved as a Hugging Face CLIP folder: the model, a ``CLIPImageProcessor`` at
the training resolution and the tokenizer files. clip-retrieval loads the folder with
``--clip_model hf_clip:<folder>``, and the CLIP score loads it as it loads openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..method.device import runtime

CONTEXT_LENGTH = 77  # clip.tokenize's
START, END = "<|startoftext|>", "<|endoftext|>"


def openai_tokenizer():
    """clip-anytorch's ``SimpleTokenizer`` (OpenAI CLIP's BPE), loaded from its file: importing the
    ``clip`` package itself needs setuptools' pkg_resources, which this environment does not have."""
    package = importlib.util.find_spec("clip")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("clip-anytorch is not installed (make setup installs it)")
    path = Path(package.submodule_search_locations[0]) / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def write_tokenizer(folder: Path):
    """OpenAI CLIP's tokenizer as Hugging Face's files (vocab.json, merges.txt) in ``folder``."""
    from transformers import CLIPTokenizer

    simple = openai_tokenizer()
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(simple.encoder))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=START, eos_token=END, unk_token=END,
                         pad_token=END, model_max_length=CONTEXT_LENGTH)  # fmt: skip


def tiny_clip(settings, resolution: int, vocab_size: int, seed: int):
    """A CLIPModel with ``settings``' widths: text context 77 over OpenAI's vocabulary, images at ``resolution``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tower = {"hidden_size": settings.width, "intermediate_size": 4 * settings.width, "num_hidden_layers": settings.layers,
             "num_attention_heads": settings.heads}  # fmt: skip
    text = {**tower, "vocab_size": vocab_size, "max_position_embeddings": CONTEXT_LENGTH, "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}  # fmt: skip
    vision = {**tower, "image_size": resolution, "patch_size": settings.patch}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=settings.embed_dim))


def image_processor(resolution: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution})


def train_tiny_clip(images: list[Image.Image], captions: list[str], settings, resolution: int, seed: int, out: Path) -> dict:
    """Trains a tiny CLIP on image-caption pairs and saves it, with its processor, as a Hugging Face
    CLIP folder ``out``; returns the last training loss and in-batch retrieval accuracy."""
    from transformers import CLIPProcessor

    tokenizer = write_tokenizer(out)
    processor = CLIPProcessor(image_processor=image_processor(resolution), tokenizer=tokenizer)
    device = runtime("fp32")
    model = device.place(tiny_clip(settings, resolution, len(tokenizer), seed)).train()
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    ids = tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    loss_value = accuracy = 0.0
    for _ in tqdm(range(settings.train_steps), desc="clip", mininterval=5):
        batch = torch.randperm(len(images), generator=generator)[: settings.batch]
        output = model(input_ids=ids[batch].to(device.device), pixel_values=pixels[batch].to(device.device))
        target = torch.arange(len(batch), device=device.device)
        loss = (nn.functional.cross_entropy(output.logits_per_image, target) + nn.functional.cross_entropy(output.logits_per_text, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = 0.9 * loss_value + 0.1 * loss.item()
        accuracy = 0.9 * accuracy + 0.1 * (output.logits_per_image.argmax(1) == target).float().mean().item()
    model.eval().cpu().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return {"loss": loss_value, "retrieval_accuracy": accuracy}


@torch.no_grad()
def image_embeddings(folder: str | Path, images: list[Image.Image], batch: int) -> torch.Tensor:
    """CLIP image embeddings (projected, not normalised) of ``images`` with the CLIP folder's own
    preprocessing, as clip-retrieval's ``hf_clip`` loader computes them."""
    from transformers import CLIPImageProcessor, CLIPModel

    device = runtime("fp32")
    model, processor = device.place(CLIPModel.from_pretrained(str(folder))), CLIPImageProcessor.from_pretrained(str(folder))
    found = []
    for start in tqdm(range(0, len(images), batch), desc="clip embed", mininterval=10):
        pixels = processor(images[start : start + batch], return_tensors="pt").pixel_values.to(device.device)
        found.append(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float().cpu())
    return torch.cat(found)
