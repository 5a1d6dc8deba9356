"""Reading the webdataset shards that img2dataset writes (``NNNNN.tar`` of jpg + txt + json)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def iter_samples(shard_dir: str | Path):
    """Yields (key, PIL image, caption) in shard and member order (deterministic)."""
    for shard in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = member
            for key in sorted(members):
                parts = members[key]
                if "jpg" not in parts or "txt" not in parts:
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(parts["jpg"]).read())).convert("RGB")
                caption = tar.extractfile(parts["txt"]).read().decode()
                yield key, image, caption


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW (the VAE's input range)."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_images(tensor: torch.Tensor) -> list[Image.Image]:
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
