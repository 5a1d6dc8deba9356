"""The training set as the encode stage writes it: shards of bounded size, read lazily.

An encode folder holds ``index.json`` (the shards in order, with their sample counts),
``empty.safetensors`` (the empty caption's embedding, float32) and ``shards/NNNNN.safetensors``
with, per sample, the VAE posterior's ``mean`` and ``std`` (float32, already scaled by the VAE's
factor) and the caption's text embedding ``context`` (float16: half the disk, and the text
encoder's output needs no more), plus ``shards/NNNNN.json`` with the keys and captions.

Writing keeps at most one shard in memory; reading copies out only the rows a batch draws, with
positioned reads at the offsets the safetensors header gives. (safetensors' own reader maps the
whole file: every page a random row touches then stays in the process's resident memory, which
grows toward the dataset's size over a long run.) Neither side grows with the number of images.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...method.errors import InputError

from ..io import read_json, write_json

FORMAT = "sharded-v1"
CONTEXT_DTYPE = torch.float16


class ShardWriter:
    """Accumulates encoded batches and writes a shard every ``shard_size`` samples."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = Path(out), shard_size
        (self.out / "shards").mkdir(parents=True)
        self.shards: list[dict] = []
        self._pending: dict[str, list] = {"mean": [], "std": [], "context": [], "keys": [], "captions": []}

    def add(self, mean: torch.Tensor, std: torch.Tensor, context: torch.Tensor, keys: list[str], captions: list[str]) -> None:
        pending = self._pending
        pending["mean"].append(mean.float().cpu())
        pending["std"].append(std.float().cpu())
        pending["context"].append(context.to("cpu", CONTEXT_DTYPE))
        pending["keys"].extend(keys)
        pending["captions"].extend(captions)
        while self.pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        pending = self._pending
        tensors = {name: torch.cat(pending[name]) for name in ("mean", "std", "context")}
        stem = f"shards/{len(self.shards):05d}"
        save_file({name: value[:count].contiguous() for name, value in tensors.items()}, self.out / f"{stem}.safetensors")
        write_json(self.out / f"{stem}.json", {"keys": pending["keys"][:count], "captions": pending["captions"][:count]})
        self.shards.append({"file": f"{stem}.safetensors", "samples": count})
        self._pending = {
            **{name: [value[count:]] for name, value in tensors.items()},
            "keys": pending["keys"][count:],
            "captions": pending["captions"][count:],
        }

    @property
    def pending(self) -> int:
        return len(self._pending["keys"])

    def close(self, empty: torch.Tensor, **info) -> int:
        """Writes the last, partial shard, the empty caption's embedding and the index; returns the sample count."""
        if self._pending["keys"]:
            self._flush(len(self._pending["keys"]))
        save_file({"empty": empty.float().cpu().contiguous()}, self.out / "empty.safetensors")
        total = sum(shard["samples"] for shard in self.shards)
        write_json(self.out / "index.json", {"format": FORMAT, "shards": self.shards, "num_samples": total, **info})
        return total


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ShardFile:
    """Rows of a safetensors file read on demand (the format: an 8-byte little-endian header
    length, a JSON header of dtype, shape and byte offsets, then the tensors' bytes)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        try:
            (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, length, 8))
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        except (struct.error, ValueError, KeyError, TypeError) as error:
            os.close(self.fd)
            raise ValueError(f"{path}: not a safetensors file ({error})") from None
        self.data_start = 8 + length
        if size < self.data_start + max(ends, default=0):
            os.close(self.fd)
            raise ValueError(f"{path}: truncated ({size} of {self.data_start + max(ends)} bytes)")
        self.tensors = {name: (SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"][0])
                        for name, info in header.items() if name != "__metadata__"}

    def row(self, name: str, index: int) -> torch.Tensor:
        dtype, shape, offset = self.tensors[name]
        size = math.prod(shape[1:]) * dtype.itemsize
        data = bytearray(os.pread(self.fd, size, self.data_start + offset + index * size))
        return torch.frombuffer(data, dtype=dtype).reshape(shape[1:])


class LatentData:
    """Cached latents and text embeddings: the encode stage's folders (its parts, in order)."""

    def __init__(self, folders):
        folders = [Path(folder) for folder in ([folders] if isinstance(folders, (str, Path)) else folders)]
        self.files: list[Path] = []
        self.starts: list[int] = [0]  # first global index of each shard, then the total
        for folder in folders:
            index = _read_index(folder)
            for shard in index["shards"]:
                self.files.append(folder / shard["file"])
                self.starts.append(self.starts[-1] + shard["samples"])
        if not self.files:
            raise InputError("data", "no encoded samples", ", ".join(map(str, folders)))
        self._handles: dict[int, ShardFile] = {}
        for shard, path in enumerate(self.files):  # headers and sizes now, not halfway through training
            try:
                self._handles[shard] = ShardFile(path)
            except ValueError as error:
                raise InputError("data", f"{error}; rerun its encode stage", path.parent) from None
        self.empty = load_file(folders[0] / "empty.safetensors")["empty"]

    def __len__(self) -> int:
        return self.starts[-1]

    def _rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shard = bisect.bisect_right(self.starts, index) - 1
        handle, row = self._handles[shard], index - self.starts[shard]
        return tuple(handle.row(name, row) for name in ("mean", "std", "context"))

    def captions(self, count: int) -> list[str]:
        """The first ``count`` captions (what the training preview draws)."""
        found = []
        for path in self.files:
            found += read_json(path.with_suffix(".json"))["captions"]
            if len(found) >= count:
                break
        return found[:count]

    def batch(self, generators: list[torch.Generator], condition_dropout: float, conditioning: str):
        """One sample per generator: x0 drawn from the VAE posterior of a random item; the empty
        caption replaces its caption with probability ``condition_dropout`` (Section 4: 10% for
        MSE, 0 for SP) and always when unconditional."""
        index = [int(torch.randint(0, len(self), (), generator=g)) for g in generators]
        mean, std, context = (torch.stack(column) for column in zip(*map(self._rows, index)))
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        x0 = mean + std * noise
        empty = self.empty.expand(len(generators), -1, -1)
        if conditioning == "uncond":
            return x0, empty
        drop = torch.stack([torch.rand((), generator=g) for g in generators]) < condition_dropout
        return x0, torch.where(drop[:, None, None], empty, context.float())


def _read_index(folder: Path) -> dict:
    path = folder / "index.json"
    if not path.is_file():
        raise InputError("data", "no index.json; is this an encode stage's folder? (run its encode stage)", folder)
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise InputError("data", f"written by an older encode (format {index.get('format')!r}, want {FORMAT!r}); rerun encode (snakemake --forcerun encode)", folder)
    missing = [shard["file"] for shard in index["shards"] if not (folder / shard["file"]).is_file()]
    if missing or not (folder / "empty.safetensors").is_file():
        raise InputError("data", f"incomplete, missing {', '.join(missing) or 'empty.safetensors'}; rerun its encode stage", folder)
    return index
