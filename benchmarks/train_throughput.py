"""Throughput of the training stage's own loop, per objective: images/s, MFU, peak memory, data wait.

    python benchmarks/train_throughput.py                                   # the smoke scale's UNet, CPU
    python benchmarks/train_throughput.py --shape sd21 --latent 64 --precision bf16 --gpu h100 --paper-batches

Unlike ``sp_step.py`` (one loss step on tensors in memory), this runs ``training.train``, the loop the
train stage runs: latents read from shards on disk (written here in encode's format, random
values), the next steps' inputs prepared on a background thread, accelerate's autocast in
``--precision`` with fp32 master weights and Adam, the EMA, loss logging, no checkpoints. Each
objective runs in its own process, so its peak memory is its own (CUDA: max allocated; CPU: max
RSS). Figures:

- images/s over the timed steps (after ``--warmup`` steps);
- MFU: images/s x FLOPs per image / the GPU's dense bf16 peak (``--gpu`` or ``--peak-tflops``);
  FLOPs per image are counted by ``selfperceptual.pipeline.cost`` (PyTorch's FlopCounterMode) on one step of
  this very model and loss, so they hold for any shape;
- the fraction of loop time spent waiting for the next step's inputs.

``--compile`` and ``--channels-last`` turn on train.compile and train.channels_last (the paper
scale's settings), lever by lever; ``--warmup`` steps then include the compilation.

On a CPU there is no meaningful peak: MFU is printed only when a peak is given. ``--paper-batches``
runs one GPU's share of the paper's global batch (896 / 8 GPUs) in each objective's paper
micro-batches and gradient checkpointing (params.yaml), so peak memory is what a paper-scale job
needs per GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from selfperceptual.method import objectives  # noqa: E402 - no torch: the plug-ins are light
OBJECTIVES = objectives.names()  # every registered objective (method.objectives), measured in this order


def write_shards(folder: Path, count: int, latent: int, length: int, width: int) -> None:
    """``count`` samples of random latents and text embeddings, as the encode stage writes them."""
    from selfperceptual.pipeline.data.latents import ShardWriter

    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, shard_size=64)
    for start in range(0, count, 16):
        size = min(16, count - start)
        writer.add(torch.randn(size, 4, latent, latent, generator=generator), torch.full((size, 4, latent, latent), 0.05),
                   torch.randn(size, length, width, generator=generator).half(), [f"{i:09d}" for i in range(start, start + size)],
                   [f"caption {i}" for i in range(start, start + size)])
    writer.close(torch.zeros(1, length, width).half())


def flops_per_image(objective: str, model, loss_fn, data, objective_config, train_config, device) -> float:
    """One training step of ``model`` and ``loss_fn`` on a micro-batch, counted, per image."""
    from selfperceptual.method import objectives
    from selfperceptual.pipeline.cost import count_flops
    from selfperceptual.pipeline.distributed import sample_generators

    generators = sample_generators(0, 0, range(train_config.max_per_device_batch))
    x0, context = data.batch(generators, objective_config.condition_dropout, "text")
    draws = loss_fn.draw(x0, generators)
    denoiser = objectives.get(objective).denoiser(model)
    loss_fn.to(device)

    def step():
        per_sample, _ = loss_fn(denoiser, x0.to(device), context.to(device), **{key: value.to(device) for key, value in draws.items()})
        per_sample.sum().backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / len(x0)


def measure(objective: str, args) -> dict:
    from selfperceptual.pipeline.config import load_params
    from selfperceptual.pipeline.data.latents import LatentData
    from selfperceptual.pipeline.distributed import BatchPlan
    from selfperceptual.method.models import SD21_BASE_UNET, SD21_TEXT_TOKENS, build_unet
    from selfperceptual.method.schedule import Schedule
    from selfperceptual.pipeline.training import train
    from sp_step import objective_parts

    torch.manual_seed(0)
    config = load_params(REPO / "params.yaml", "smoke")[1]
    if args.shape == "sd21":
        from diffusers import UNet2DConditionModel

        unet, length, width, latent = UNet2DConditionModel(**SD21_BASE_UNET), SD21_TEXT_TOKENS, SD21_BASE_UNET["cross_attention_dim"], args.latent or 64
    else:
        base = config.base
        latent = args.latent or config.download.resolution // 2 ** (len(base.vae.block_out_channels) - 1)
        unet, length, width = build_unet(base.unet, latent, base.vae.latent_channels, base.text.hidden_size, seed=0), base.text.max_length, base.text.hidden_size
    steps = args.warmup + args.steps
    train_config = config.train.model_copy(update={
        "global_batch": args.global_batch, "max_per_device_batch": args.micro_batch, "precision": args.precision,
        "log_every_steps": 10, "preview_every_steps": 0, "compile": args.compile, "channels_last": args.channels_last,
    })
    memory = {}
    if args.paper_batches:
        paper = load_params(REPO / "params.yaml", "paper")[1]
        memory = {key: getattr(paper.train.objective(objective), key) for key in ("max_per_device_batch", "gradient_checkpointing")}
        train_config = train_config.model_copy(update={"global_batch": paper.train.global_batch // paper.resources.train.gpus,
                                                       "max_per_device_batch": paper.train.max_per_device_batch})
    objective_config = train_config.objective(objective).model_copy(update={"num_steps": steps, **memory})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        write_shards(Path(folder) / "shards", args.samples, latent, length, width)
        data = LatentData([Path(folder) / "shards"])
        model, loss_fn = objective_parts(objective, args.shape, unet, Path(folder), Schedule.zero_snr())
        per_image = flops_per_image(objective, model.to(device), loss_fn, data, objective_config, train_config, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed = {}

        class Clock:  # the time of the steps after the warm-up, from the loop's own logging
            def logged(self, step, points):
                timed.setdefault("first", (step, time.perf_counter()))
                timed["last"] = (step, time.perf_counter())

            def preview(self, step, ema):
                pass

        train_config = train_config.model_copy(update={"log_every_steps": args.warmup})
        result = train(model, data, loss_fn, objective_config, train_config, "text", 1000, None, Clock(), objective)
    (first_step, first_time), (last_step, last_time) = timed["first"], timed["last"]
    images_per_s = (last_step - first_step) * train_config.global_batch / (last_time - first_time)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loop_s = result.seconds_per_step * steps
    plan = BatchPlan.derive(train_config.global_batch, 1, objective_config.max_per_device_batch or train_config.max_per_device_batch)
    return {"objective": objective, "images_per_s": images_per_s, "flops_per_image": per_image, "peak_gib": peak / 2**30,
            "data_wait_fraction": result.data_wait_s / loop_s, "latent": latent, "device": str(device),
            "batch": f"{train_config.global_batch}/{plan.per_device}{' checkpointed' if objective_config.gradient_checkpointing else ''}"}


def main() -> None:
    from selfperceptual.pipeline.cost import PEAK_BF16_TFLOPS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("smoke", "sd21"), default="smoke", help="the smoke scale's UNet (params.yaml) or SD 2.1-base's")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--latent", type=int, help="latent side (default: the shape's own; SD 2.1-base at 512 px: 64)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="train.precision (the paper's: bf16)")
    parser.add_argument("--global-batch", type=int, default=16, help="train.global_batch of the loop (one process)")
    parser.add_argument("--micro-batch", type=int, default=16, help="train.max_per_device_batch")
    parser.add_argument("--paper-batches", action="store_true", help="one GPU's share of the paper's global batch, each objective's paper micro-batch")
    parser.add_argument("--samples", type=int, default=256, help="samples in the shards on disk")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile the UNet(s) and SP's f* (Inductor)")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last: NHWC layout of the step's networks")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), help="the GPU whose dense bf16 peak MFU is taken against")
    parser.add_argument("--peak-tflops", type=float, help="that peak, given directly")
    parser.add_argument("--objective", choices=OBJECTIVES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.objective:  # a child process: one objective, reported as JSON
        print(json.dumps(measure(args.objective, args)))
        return
    peak = args.peak_tflops or (PEAK_BF16_TFLOPS[args.gpu] if args.gpu else None)
    rows = []
    for objective in args.objectives:
        child = [sys.executable, __file__, *sys.argv[1:], "--objective", objective]
        result = subprocess.run(child, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{objective} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"shape={args.shape} latent={first['latent']}x{first['latent']} precision={args.precision} compile={args.compile} "
          f"channels_last={args.channels_last} device={first['device']} "
          f"peak={f'{peak:g} TFLOP/s' if peak else 'none given'}")
    print(f"{'objective':<10}{'images/s':>10}{'GFLOP/image':>13}{'MFU':>7}{'peak GiB':>10}{'data wait':>11}  batch/micro-batch")
    for row in rows:
        mfu = f"{row['images_per_s'] * row['flops_per_image'] / (peak * 1e12):.1%}" if peak else "—"
        print(f"{row['objective']:<10}{row['images_per_s']:>10.1f}{row['flops_per_image'] / 1e9:>13.6g}{mfu:>7}{row['peak_gib']:>10.2f}"
              f"{row['data_wait_fraction']:>11.1%}  {row['batch']}")
    mse = next((row for row in rows if row["objective"] == "mse"), None)
    if mse:
        print("time per image over MSE's: " + "  ".join(f"{row['objective']}/mse {mse['images_per_s'] / row['images_per_s']:.2f}" for row in rows))


if __name__ == "__main__":
    main()
