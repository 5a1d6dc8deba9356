"""Reading the webdataset shards that img2dataset writes (``NNNNN.tar`` of jpg + txt + json).

A download may be split into several jobs; their folders, read in order, are one dataset. Each
sample's key is its row in the filter's ``kept.parquet`` (the ``ROW`` column the download stage
saves), so keys do not depend on the split.
"""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..io import cores

if TYPE_CHECKING:  # torch is imported where it is used
    import torch


def _shard_members(folders):
    """(tar file, {extension: member}) of every complete sample, in dataset order."""
    for folder in folders:
        for shard in sorted((Path(folder) / "shards").glob("*.tar")):
            with tarfile.open(shard) as tar:
                members: dict[str, dict] = {}
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = member
                for key in sorted(members):
                    if "jpg" in members[key] and "txt" in members[key]:
                        yield tar, key, members[key]


def count_samples(folders) -> int:
    return sum(1 for _ in _shard_members(folders))


def _encoded_samples(folders, start: int, stop: int | None):
    """(key, JPEG bytes, caption) of samples [start, stop) of the download folders, in order."""
    for position, (tar, key, parts) in enumerate(_shard_members(folders)):
        if stop is not None and position >= stop:
            return
        if position < start:
            continue
        meta = json.loads(tar.extractfile(parts["json"]).read()) if "json" in parts else {}
        jpeg, caption = tar.extractfile(parts["jpg"]).read(), tar.extractfile(parts["txt"]).read().decode()
        yield (f"{meta['ROW']:09d}" if "ROW" in meta else key), jpeg, caption


def _decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def iter_samples(folders, start: int = 0, stop: int | None = None):
    """Yields (key, PIL image, caption) of samples [start, stop) of the download folders, in order."""
    for key, jpeg, caption in _encoded_samples(folders, start, stop):
        yield key, _decode(jpeg), caption


def sample_batches(folders, size: int, start: int = 0, stop: int | None = None):
    """Yields lists of up to ``size`` (key, PIL image, caption), the samples [start, stop) in order,
    as iter_samples gives them. The JPEGs of the next batch decode on a thread per core (PIL's
    decoder releases the GIL) while the caller works on the current one (encode: on the GPU)."""

    def batches():
        batch = []
        for sample in _encoded_samples(folders, start, stop):
            batch.append(sample)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    with ThreadPoolExecutor(max_workers=cores()) as pool:
        ahead = None
        for batch in batches():
            decoding = [(key, pool.submit(_decode, jpeg), caption) for key, jpeg, caption in batch]
            if ahead is not None:
                yield [(key, image.result(), caption) for key, image, caption in ahead]
            ahead = decoding
        if ahead is not None:
            yield [(key, image.result(), caption) for key, image, caption in ahead]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW (the VAE's input range)."""
    import torch  # here: download counts samples with this module and needs no torch

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_images(tensor: torch.Tensor) -> list[Image.Image]:
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
