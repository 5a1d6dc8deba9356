"""The one training loop. MSE and self-perceptual runs share every line but the loss callable."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .io import read_json
from .losses import MSELoss, SelfPerceptualLoss
from .schedule import Schedule
from .unet import Denoiser, PerceptualNetwork

NUM_T_BUCKETS = 4  # the loss is also logged per quarter of the timestep range


class LatentData:
    """Cached latents and text embeddings (the encode stage's folder)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        latents = load_file(folder / "latents.safetensors")
        text = load_file(folder / "text.safetensors")
        self.mean, self.std = latents["mean"], latents["std"]
        self.context, self.empty = text["context"], text["empty"]
        self.captions = read_json(folder / "index.json")["captions"]

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, size: int, condition_dropout: float, conditioning: str, generator: torch.Generator):
        """x0 drawn from the VAE posterior; the empty caption replaces a caption with probability
        ``condition_dropout`` (Section 4: 10% for MSE, 0 for SP) and always when unconditional."""
        index = torch.randint(0, len(self), (size,), generator=generator)
        x0 = self.mean[index] + self.std[index] * torch.randn(self.mean[index].shape, generator=generator)
        empty = self.empty.expand(size, -1, -1)
        if conditioning == "uncond":
            return x0, empty
        drop = torch.rand(size, generator=generator) < condition_dropout
        return x0, torch.where(drop[:, None, None], empty, self.context[index])


def build_loss(objective: str, train_config, schedule: Schedule, perceptual_dir: Path | None):
    """The loss callable and its settings section for an objective (``mse`` or ``sp``)."""
    if objective == "mse":
        return MSELoss(schedule), train_config.mse
    if objective == "sp":
        if perceptual_dir is None:
            raise ValueError("the sp objective needs --perceptual (a freeze stage's folder)")
        sp = train_config.sp
        if not (perceptual_dir / "network" / "config.json").is_file():
            raise FileNotFoundError(f"--perceptual {perceptual_dir}: no frozen network (network/config.json); run its freeze stage")
        perceptual = PerceptualNetwork.load(perceptual_dir / "network", sp.layer)
        return SelfPerceptualLoss(schedule, perceptual, sp.distance, sp.t_prime, sp.formulation), sp
    raise ValueError(f"unknown objective {objective!r}; choose mse or sp")


class LossHistory:
    """The loss curve, overall and by timestep bucket, averaged over each logging window."""

    def __init__(self, num_train_timesteps: int):
        self.bucket_width = num_train_timesteps // NUM_T_BUCKETS
        self.series: dict[str, list[tuple[int, float]]] = {}
        self._window: dict[str, list[float]] = {}

    def record(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        self._window.setdefault("loss", []).extend(per_sample.tolist())
        bucket = (t // self.bucket_width).clamp(max=NUM_T_BUCKETS - 1)
        for b, value in zip(bucket.tolist(), per_sample.tolist()):
            lo = b * self.bucket_width
            self._window.setdefault(f"loss_t{lo:04d}_{lo + self.bucket_width - 1:04d}", []).append(value)

    def flush(self, step: int) -> float:
        for key, values in self._window.items():
            self.series.setdefault(key, []).append((step, sum(values) / len(values)))
        self._window = {}
        return self.series["loss"][-1][1]


def train(unet, data: LatentData, loss_fn, objective_config, train_config, conditioning: str, num_train_timesteps: int):
    """Trains ``unet`` in place; returns (EMA copy, LossHistory, seconds per step)."""
    # Initialize.
    unet.train()
    denoiser = Denoiser(unet)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(unet.parameters(), lr=objective_config.learning_rate)
    history = LossHistory(num_train_timesteps)
    started = time.perf_counter()
    progress = tqdm(range(objective_config.num_steps), desc="train", mininterval=5)
    for step in progress:
        # The batch, noise and timesteps come from a generator seeded by (seed, step), so a run
        # resumed at any step follows the same random stream.
        generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
        x0, context = data.batch(train_config.global_batch, objective_config.condition_dropout, conditioning, generator)

        # Evaluate the loss and update.
        per_sample, logs = loss_fn(denoiser, x0, context, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()

        # Update the EMA (Section 4: decay 0.9995 at the paper's scale).
        with torch.no_grad():
            for averaged, online in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(online, 1.0 - train_config.ema_decay)

        # Log.
        history.record(per_sample.detach(), logs["t"])
        if (step + 1) % train_config.log_every_steps == 0 or step + 1 == objective_config.num_steps:
            progress.set_postfix(loss=f"{history.flush(step + 1):.4f}")
    seconds_per_step = (time.perf_counter() - started) / objective_config.num_steps
    return ema, history, seconds_per_step
