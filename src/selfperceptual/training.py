"""The one training loop. MSE and self-perceptual runs share every line but the loss callable."""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm import tqdm

from .distributed import ACCELERATE_PRECISION, BatchPlan, sample_generators
from .io import read_json
from .losses import MSELoss, SelfPerceptualLoss
from .schedule import Schedule
from .unet import Denoiser, PerceptualNetwork

NUM_T_BUCKETS = 4  # the loss is also logged per quarter of the timestep range


class LatentData:
    """Cached latents and text embeddings: the encode stage's folders (its parts, in order)."""

    def __init__(self, folders):
        folders = [Path(folder) for folder in ([folders] if isinstance(folders, (str, Path)) else folders)]
        latents = [load_file(folder / "latents.safetensors") for folder in folders]
        text = [load_file(folder / "text.safetensors") for folder in folders]
        self.mean = torch.cat([part["mean"] for part in latents])
        self.std = torch.cat([part["std"] for part in latents])
        self.context = torch.cat([part["context"] for part in text])
        self.empty = text[0]["empty"]
        self.captions = [caption for folder in folders for caption in read_json(folder / "index.json")["captions"]]

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, generators: list[torch.Generator], condition_dropout: float, conditioning: str):
        """One sample per generator: x0 drawn from the VAE posterior of a random item; the empty
        caption replaces its caption with probability ``condition_dropout`` (Section 4: 10% for
        MSE, 0 for SP) and always when unconditional."""
        index = torch.stack([torch.randint(0, len(self), (), generator=g) for g in generators])
        noise = torch.stack([torch.randn(self.mean.shape[1:], generator=g) for g in generators])
        x0 = self.mean[index] + self.std[index] * noise
        empty = self.empty.expand(len(generators), -1, -1)
        if conditioning == "uncond":
            return x0, empty
        drop = torch.stack([torch.rand((), generator=g) for g in generators]) < condition_dropout
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
    """Trains ``unet`` in place on every process of the launch; returns (EMA copy, LossHistory,
    seconds per step) on the main process and (None, None, seconds) on the others."""
    # Initialize.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=ACCELERATE_PRECISION[train_config.precision])
    plan = BatchPlan.derive(train_config.global_batch, accelerator.num_processes, train_config.max_per_device_batch)
    device, main = accelerator.device, accelerator.is_main_process
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval().to(device) if main else None
    optimizer = torch.optim.Adam(unet.parameters(), lr=objective_config.learning_rate)
    model, optimizer = accelerator.prepare(unet, optimizer)
    denoiser, loss_fn = Denoiser(model), loss_fn.to(device)
    history = LossHistory(num_train_timesteps) if main else None
    positions = plan.samples_of(accelerator.process_index)
    started = time.perf_counter()
    progress = tqdm(range(objective_config.num_steps), desc="train", mininterval=5, disable=not main)
    for step in progress:
        # This process's samples of the global batch, each with its own generator seeded by
        # (seed, step, position): a resumed or differently split run sees the same stream.
        generators = sample_generators(train_config.seed, step, positions)
        x0, context = data.batch(generators, objective_config.condition_dropout, conditioning)
        noise = loss_fn.draw(x0, generators)

        # Evaluate the loss and accumulate gradients: d/dtheta of the mean over the global batch
        # (DDP averages over processes, hence the factor num_processes).
        optimizer.zero_grad(set_to_none=True)
        per_sample_losses, timesteps = [], []
        for k, micro in enumerate(plan.micro_batches()):
            sync = accelerator.no_sync(model) if k < plan.accumulation - 1 else contextlib.nullcontext()
            with sync:
                with accelerator.autocast():
                    per_sample, logs = loss_fn(
                        denoiser, x0[micro].to(device), context[micro].to(device), **{key: value[micro].to(device) for key, value in noise.items()}
                    )
                accelerator.backward(per_sample.sum() * plan.num_processes / plan.global_batch)
            per_sample_losses.append(per_sample.detach().float())
            timesteps.append(logs["t"])
        optimizer.step()

        # Update the EMA (Section 4: decay 0.9995 at the paper's scale).
        if main:
            with torch.no_grad():
                for averaged, online in zip(ema.parameters(), accelerator.unwrap_model(model).parameters()):
                    averaged.lerp_(online.detach(), 1.0 - train_config.ema_decay)

        # Log.
        losses, t = accelerator.gather(torch.cat(per_sample_losses)), accelerator.gather(torch.cat(timesteps))
        if main:
            history.record(losses.cpu(), t.cpu())
            if (step + 1) % train_config.log_every_steps == 0 or step + 1 == objective_config.num_steps:
                progress.set_postfix(loss=f"{history.flush(step + 1):.4f}")
    accelerator.wait_for_everyone()
    seconds_per_step = (time.perf_counter() - started) / objective_config.num_steps
    return ema, history, seconds_per_step
