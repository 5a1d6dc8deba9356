"""Step time and peak memory of an MSE step, our SP step, a naive Algorithm 1 step, and the peers' steps (LPL, Cas-DM).

    python benchmarks/sp_step.py                      # local-scale UNet and batch, CPU
    python benchmarks/sp_step.py --shape sd21 --device cuda --dtype bfloat16 --latent 64

All run on the same UNet, batch and latents. "naive" is Algorithm 1 as public ports write
it: a full deep copy of the UNet with a forward hook on the mid block, both branches with
autograd. "lpl" adds the VAE decoder's features below t = 200; "casdm" trains both cascaded
modules with LPIPS on decoded images (the shape's VAE; LPIPS over the evaluation network for the
local shape, over VGG16 with random weights for sd21). Each variant runs in its own process so peak memory is its own (CPU: max RSS; CUDA:
max allocated). Ratios are to the MSE step measured in the same run: each variant runs
``--rounds`` times, interleaved with the others. Ratios are taken within a round; every round's
ratios are printed, and the table shows the medians over the rounds (each round's step time is
the median of its timed steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("mse", "sp", "naive", "lpl", "casdm")  # "naive": this benchmark's own port of Algorithm 1; the others, registered objectives


def build(shape: str):
    """(unet, text length, text width, latent side) for the local scale's UNet or SD 2.1-base's."""
    from diffusers import UNet2DConditionModel

    from selfperceptual.method.models import SD21_BASE_UNET, SD21_TEXT_TOKENS, build_unet

    if shape == "sd21":
        return UNet2DConditionModel(**SD21_BASE_UNET), SD21_TEXT_TOKENS, SD21_BASE_UNET["cross_attention_dim"], 64
    config = local_config()
    base, latent = config.base, config.download.resolution // 2 ** (len(config.base.vae.block_out_channels) - 1)
    unet = build_unet(base.unet, latent, base.vae.latent_channels, base.text.hidden_size, seed=0)
    return unet, base.text.max_length, base.text.hidden_size, latent


def local_config():
    from selfperceptual.pipeline.config import load_params

    return load_params(REPO / "params.yaml", "local")[1]


def objective_parts(name: str, shape: str, unet, folder: Path, schedule):
    """(the trained model, its loss) of a registered objective on ``unet``, made as the train stage
    makes them (method.objectives), from the local scale's settings. The inputs an objective reads
    are written to ``folder`` first: SP's f* (a freeze folder of ``unet``); Cas-DM's LPIPS network,
    the local scale's evaluation network or, for sd21, VGG16 with random weights (the cost, not the
    values). LPL and Cas-DM decode with the shape's VAE."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from selfperceptual.method import objectives
    from selfperceptual.method.featnet import TinyFeatureNet
    from selfperceptual.method.models import SD21_BASE_VAE, build_vae
    from selfperceptual.pipeline.data.corpus import NUM_CLASSES
    from selfperceptual.pipeline.rehearsal import write_vgg_weights

    config = local_config()
    objective, settings = objectives.get(name), config.train.objective(name)
    vae = AutoencoderKL(**SD21_BASE_VAE) if shape == "sd21" else build_vae(config.base.vae, config.download.resolution, seed=0)
    inputs = {}
    for input_name in objective.inputs:  # every input an objective may read, written as its stage writes it
        inputs[input_name] = folder / input_name
        inputs[input_name].mkdir(parents=True, exist_ok=True)
    if "perceptual" in inputs:
        unet.save_pretrained(inputs["perceptual"] / "network", safe_serialization=True)
    if "metric" in inputs:
        TinyFeatureNet(NUM_CLASSES, config.featnet.feature_dim).save(inputs["metric"])
    if shape == "sd21" and "metric" in objective.inputs:  # SD's size: LPIPS over VGG16, as at the paper scale
        write_vgg_weights(folder / "vgg16.pth", seed=0)
        settings = settings.model_copy(update={"metric": "vgg", "metric_weights": str(folder / "vgg16.pth")})
    pipeline = SimpleNamespace(unet=unet, vae=vae)
    model = objective.trained_model(pipeline, schedule)
    return model, objective.loss(settings, schedule, pipeline, {key: inputs[key] for key in objective.needs(settings)})


def loss_networks(loss_fn) -> list[torch.nn.Module]:
    """The networks a loss holds of its own (f*, the VAE, LPIPS)."""
    return [value for value in vars(loss_fn).values() if isinstance(value, torch.nn.Module)]


class NaiveSelfPerceptual:
    """Algorithm 1 with a full frozen copy, a mid-block hook and autograd on both branches."""

    def __init__(self, schedule, unet):
        self.schedule = schedule
        self.frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        self.captured = {}
        self.frozen.mid_block.register_forward_hook(lambda module, args, output: self.captured.__setitem__("mid", output))

    def _feature(self, x, t, context):
        self.frozen(x, t, encoder_hidden_states=context)
        return self.captured["mid"]

    def __call__(self, denoiser, x0, context, generator=None):
        s = self.schedule
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # drawn on the CPU, as ours
        t = s.sample_timesteps(len(x0), generator).to(x0.device)
        x_t = s.add_noise(x0, eps, t)
        v_hat = denoiser(x_t, t, context)
        x0_hat, eps_hat = s.x0_from_v(x_t, v_hat, t), s.eps_from_v(x_t, v_hat, t)
        t_prime = s.sample_timesteps(len(x0), generator).to(x0.device)
        real = self._feature(s.add_noise(x0, eps, t_prime), t_prime, context)
        predicted = self._feature(s.add_noise(x0_hat, eps_hat, t_prime), t_prime, context)
        return ((predicted.float() - real.float()) ** 2).flatten(1).mean(1), {"t": t}


def measure(variant: str, args) -> dict:
    import tempfile

    from selfperceptual.method import objectives
    from selfperceptual.method.schedule import Schedule

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet, length, width, latent = build(args.shape)
    latent = args.latent or latent
    schedule = Schedule.zero_snr()
    if variant == "naive":  # its full frozen copy is made of the UNet in the step's dtype
        model = unet.to(device, dtype)
        denoiser, loss_fn = objectives.get("mse").denoiser(model), NaiveSelfPerceptual(schedule, model)
    else:
        with tempfile.TemporaryDirectory() as folder:
            model, loss_fn = objective_parts(variant, args.shape, unet, Path(folder), schedule)
        denoiser = objectives.get(variant).denoiser(model)
        for network in loss_networks(loss_fn):
            network.to(device, dtype)
    model.to(device, dtype).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)  # every variant draws its noise on the CPU, as training does
    x0 = torch.randn(args.batch, 4, latent, latent, generator=generator, dtype=dtype).to(device)
    context = torch.randn(args.batch, length, width, generator=generator, dtype=dtype).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        per_sample, _ = loss_fn(denoiser, x0, context, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "step_s": statistics.median(times), "peak_mib": peak / 2**20, "latent": latent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("local", "sd21"), default="local", help="the local scale's UNet (params.yaml) or SD 2.1-base's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=48, help="the local scale's global batch")
    parser.add_argument("--latent", type=int, help="latent side (default: the shape's own; SD 2.1-base at 512 px: 64)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per process; the median is kept")
    parser.add_argument("--rounds", type=int, default=5, help="processes per variant, interleaved; the table shows medians over them")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: measure one variant and report it as JSON
        print(json.dumps(measure(args.variant, args)))
        return
    variants = VARIANTS
    # Rounds interleave the variants, so a slow spell of a shared machine hits all three alike.
    # Ratios are taken within a round (a paired comparison); the table shows each variant's median
    # time, peak memory and ratio over the rounds.
    rounds = []
    for _ in range(args.rounds):
        measured = {}
        for variant in variants:
            child = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            measured[variant] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rounds.append(measured)

    def median_of(variant: str, figure) -> float:
        return statistics.median(figure(measured[variant], measured["mse"]) for measured in rounds)

    latent = rounds[0]["mse"]["latent"]
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} latent={latent}x{latent} threads={torch.get_num_threads()}")
    for number, measured in enumerate(rounds, 1):
        ratios = "  ".join(f"{variant}/mse {measured[variant]['step_s'] / measured['mse']['step_s']:.2f}" for variant in variants[1:])
        print(f"round {number}: mse {measured['mse']['step_s']:.3f}s  {ratios}")
    print(f"{'step':<8}{'time/step':>12}{'x MSE':>8}{'peak MiB':>11}{'x MSE':>8}")
    for variant in variants:
        step_s = median_of(variant, lambda row, mse: row["step_s"])
        step_ratio = median_of(variant, lambda row, mse: row["step_s"] / mse["step_s"])
        peak_mib = median_of(variant, lambda row, mse: row["peak_mib"])
        peak_ratio = median_of(variant, lambda row, mse: row["peak_mib"] / mse["peak_mib"])
        print(f"{variant:<8}{step_s:>11.3f}s{step_ratio:>8.2f}{peak_mib:>11.0f}{peak_ratio:>8.2f}")


if __name__ == "__main__":
    main()
