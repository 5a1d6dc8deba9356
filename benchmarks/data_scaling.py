"""Peak memory of training on 1x and on Nx the data: the training set must stream, not load.

    python benchmarks/data_scaling.py                     # 2,000 and 40,000 samples
    python benchmarks/data_scaling.py --samples 200 --factor 20 --steps 3

Writes two encode folders of random samples with the encode stage's writer (``ShardWriter``:
float32 latents 4x32x32, float16 text embeddings 77x256, shards of ``--shard-size``), then runs
the real training loop on each in its own process and reads that process's peak RSS. The last
line is ``rss_ratio=<Nx peak / 1x peak>``; the target is at most 1.1. Holding the data in memory,
as the pipeline once did, makes the ratio grow with N.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

LATENT, TOKENS, WIDTH = (4, 32, 32), 77, 256


def write_data(folder: Path, samples: int, shard_size: int) -> None:
    from selfperceptual.pipeline.data.latents import ShardWriter

    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, shard_size)
    for start in range(0, samples, 500):
        size = min(500, samples - start)
        writer.add(torch.randn(size, *LATENT, generator=generator), torch.full((size, *LATENT), 0.1),
                   torch.randn(size, TOKENS, WIDTH, generator=generator), [f"{i:09d}" for i in range(start, start + size)],
                   [f"caption {i}" for i in range(start, start + size)])
    writer.close(torch.zeros(1, TOKENS, WIDTH))


def train_and_measure(folder: Path, steps: int) -> int:
    """Runs the training loop on ``folder``; returns this process's peak RSS in KiB."""
    from selfperceptual.pipeline.config import load_params
    from selfperceptual.method.losses import MSELoss
    from selfperceptual.method.models import build_unet
    from selfperceptual.method.schedule import Schedule
    from selfperceptual.pipeline.training import LatentData, train

    config = load_params(Path(__file__).resolve().parents[1] / "params.yaml", "smoke")[1]
    settings = config.train.model_copy(update={"global_batch": 32, "max_per_device_batch": 32})
    objective = settings.mse.model_copy(update={"num_steps": steps})
    unet_settings = SimpleNamespace(block_out_channels=[16, 32], layers_per_block=1, attention_heads=2, norm_num_groups=8)
    unet = build_unet(unet_settings, LATENT[1], LATENT[0], WIDTH, seed=0)
    train(unet, LatentData(folder), MSELoss(Schedule.zero_snr()), objective, settings, "text", 1000)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="samples of the 1x training set")
    parser.add_argument("--factor", type=int, default=20, help="the larger set has factor x samples")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one measurement, in its own process
    args = parser.parse_args()
    if args.worker:
        print(train_and_measure(args.worker, args.steps))
        return
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, args.factor):
            folder = Path(tmp) / f"x{factor}"
            write_data(folder, args.samples * factor, args.shard_size)
            on_disk = sum(path.stat().st_size for path in folder.rglob("*")) / 2**20
            command = [sys.executable, __file__, "--worker", str(folder), "--steps", str(args.steps)]
            peaks[factor] = int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
            print(f"{factor:>3}x  samples {args.samples * factor:>7}  on disk {on_disk:8.1f} MiB  peak RSS {peaks[factor] / 1024:8.1f} MiB")
    print(f"rss_ratio={peaks[args.factor] / peaks[1]:.3f}")


if __name__ == "__main__":
    main()
