"""The one training loop. Every objective (method.objectives: MSE, SP, the peers LPL and Cas-DM, and any
registered since) shares every line but the loss callable and the model it trains."""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..method import objectives
from .checkpoints import CheckpointStore
from .data.latents import LatentData  # noqa: F401 - the training set, re-exported for the stages and tests
from .distributed import ACCELERATE_PRECISION, BatchPlan, sample_generators
from ..method.unet import compiled, finite_weights

NUM_T_BUCKETS = 4  # the loss is also logged per quarter of the timestep range


class LossHistory:
    """The loss curve, overall and by timestep bucket, averaged over each logging window. Each
    point is (step, value, unix time in ms): the time makes a re-sent point a duplicate that the
    tracker drops."""

    def __init__(self, num_train_timesteps: int):
        self.bucket_width = num_train_timesteps // NUM_T_BUCKETS
        self.series: dict[str, list[tuple[int, float, int]]] = {}
        self._window: dict[str, list[float]] = {}

    def record(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        self._window.setdefault("loss", []).extend(per_sample.tolist())
        bucket = (t // self.bucket_width).clamp(max=NUM_T_BUCKETS - 1)
        for b, value in zip(bucket.tolist(), per_sample.tolist()):
            lo = b * self.bucket_width
            self._window.setdefault(f"loss_t{lo:04d}_{lo + self.bucket_width - 1:04d}", []).append(value)

    def flush(self, step: int) -> dict[str, tuple[int, float, int]]:
        """Closes the window at ``step``; returns its points by series."""
        now = int(time.time() * 1000)
        points = {key: (step, sum(values) / len(values), now) for key, values in self._window.items()}
        for key, point in points.items():
            self.series.setdefault(key, []).append(point)
        self._window = {}
        return points

    def final(self) -> float:
        return self.series["loss"][-1][1]

    def state_dict(self) -> dict:
        return {"series": self.series, "window": self._window}

    def load_state_dict(self, state: dict) -> None:
        self.series = {key: [tuple(point) for point in points] for key, points in state["series"].items()}
        self._window = state["window"]


class TrainingInterrupted(Exception):
    """SIGTERM arrived (a SLURM time limit, a preemption); the state at ``step`` was checkpointed."""

    def __init__(self, step: int):
        super().__init__(f"training stopped by SIGTERM after step {step}")
        self.step = step


class TrainingDiverged(Exception):
    """The loss of ``step`` (or, with ``weights``, the weights after it) is not finite: NaN or inf.
    Nothing of that step or later was saved; ``data_finite`` says whether that step's batch was."""

    def __init__(self, step: int, data_finite: bool, weights: bool = False):
        what = "the weights after step" if weights else "the loss at step"
        super().__init__(f"{what} {step} are not finite (NaN or inf)" if weights else f"{what} {step} is not finite (NaN or inf)")
        self.step, self.data_finite, self.weights = step, data_finite, weights


class StopFlag:
    """Notes SIGTERM instead of dying, so the loop can finish its step and checkpoint first."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.getLogger("train").warning("SIGTERM: stopping after this step, with a checkpoint")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, accelerator) -> bool:
        """True when any process was asked to stop: all stop after the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@dataclass
class StepInputs:
    """What one training step reads: x0, the text context and the loss's draws (eps, t, ...), on the CPU."""

    x0: torch.Tensor
    context: torch.Tensor
    draws: dict[str, torch.Tensor]

    def pinned(self) -> StepInputs:
        """In page-locked memory, so that copying to the GPU need not wait for the copy."""
        return StepInputs(self.x0.pin_memory(), self.context.pin_memory(), {key: value.pin_memory() for key, value in self.draws.items()})


class Prefetch:
    """The inputs of the coming steps, prepared on a background thread while the current step
    trains: the same tensors as preparing them in line, since each step's randomness comes from its
    own generators. ``waited_s`` is the time the loop spent waiting for them."""

    def __init__(self, prepare: Callable[[int], StepInputs], steps: range, pin: bool, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._work, args=(prepare, steps, pin), name="prefetch", daemon=True)
        self._thread.start()

    def _work(self, prepare, steps, pin) -> None:
        for step in steps:
            try:
                item = prepare(step)
                item = item.pinned() if pin else item
            except BaseException as error:  # raised in the training loop, where it stops training
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[StepInputs]:
        return self

    def __next__(self) -> StepInputs:
        started = time.perf_counter()
        item = self._queue.get()
        self.waited_s += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def update_ema(ema: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * online, every parameter in one multi-tensor call."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in online.parameters()], 1.0 - decay)


class Monitor:
    """What a stage hooks into the loop (live tracking, previews); called on the main process."""

    def logged(self, step: int, points: dict) -> None: ...

    def preview(self, step: int, ema) -> None: ...


@dataclass
class TrainResult:
    ema: torch.nn.Module | None  # None on processes other than the first
    history: LossHistory | None
    seconds_per_step: float
    first_step: int  # 0, or the step a checkpoint resumed from
    data_wait_s: float = 0.0  # of this run, spent waiting for the next step's inputs


def train(
    unet, data, loss_fn, objective_config, train_config, conditioning: str, num_train_timesteps: int,
    checkpoints: CheckpointStore | None = None, monitor: Monitor | None = None, objective: str = "mse",
) -> TrainResult:
    """Trains ``unet`` (the model ``objective`` trains: objectives.Objective.trained_model) in place
    on every process of the launch, from the latest checkpoint of ``checkpoints`` when there is one.
    Raises TrainingInterrupted on SIGTERM, after a checkpoint, and TrainingDiverged when a loss or
    the weights stop being finite, before anything of that step is logged or saved."""
    # Initialize.
    plugin = objectives.get(objective)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=ACCELERATE_PRECISION[train_config.precision])
    max_per_device = objective_config.max_per_device_batch or train_config.max_per_device_batch
    plan = BatchPlan.derive(train_config.global_batch, accelerator.num_processes, max_per_device)
    device, main = accelerator.device, accelerator.is_main_process
    on_gpu = device.type == "cuda"
    monitor = monitor or Monitor()
    unet.train()
    memory_format = torch.channels_last if train_config.channels_last else torch.preserve_format
    if train_config.channels_last:
        unet.to(memory_format=memory_format)  # first: the EMA and the optimizer's state take its layout
    ema = copy.deepcopy(unet).requires_grad_(False).eval() if main else None
    # One fused kernel for the whole update on a GPU; on the CPU, PyTorch's default there (a tensor at a time, as before).
    optimizer = torch.optim.Adam(unet.parameters(), lr=objective_config.learning_rate, fused=on_gpu or None)
    history, first_step, seconds_before = LossHistory(num_train_timesteps), 0, 0.0
    latest, state = checkpoints.resume(unet, ema, optimizer, main) if checkpoints else (None, None)
    if latest is not None:  # resume: the same weights, EMA, optimizer state and loss curve
        first_step, seconds_before = state["step"], state["train_seconds"]
        history.load_state_dict(state["history"])
        logging.getLogger("train").info("resuming from %s (step %d)", latest, first_step)
    ema = ema.to(device) if main else None
    if objective_config.gradient_checkpointing:
        for network in plugin.networks(unet):
            network.enable_gradient_checkpointing()
    loss_fn = loss_fn.to(device, memory_format=memory_format)
    if train_config.compile:  # in place: the state dicts, checkpoints and EMA keep their keys
        for network in plugin.networks(unet):
            network.forward = compiled(network.forward)
        loss_fn.compile()
    model, optimizer = accelerator.prepare(unet, optimizer)
    denoiser = plugin.denoiser(model)
    positions = plan.samples_of(accelerator.process_index)
    num_steps = objective_config.num_steps

    def prepare(step: int) -> StepInputs:
        # This process's samples of the global batch, each with its own generator seeded by
        # (seed, step, position): a resumed or differently split run sees the same stream.
        generators = sample_generators(train_config.seed, step, positions)
        x0, context = data.batch(generators, objective_config.condition_dropout, conditioning)
        return StepInputs(x0, context, loss_fn.draw(x0, generators))

    def flush_losses() -> None:
        """Moves the losses of the steps since the last flush to the history (one host sync)."""
        if pending:
            losses, t = accelerator.gather(torch.cat([l for l, _ in pending])), accelerator.gather(torch.cat([t for _, t in pending]))
            if main:
                history.record(losses.cpu(), t.cpu())
            pending.clear()

    def check_finite(done: int, saving: bool) -> None:
        """Stops before a non-finite loss (of any step so far, any process) or weights reach the
        history, MLflow or a checkpoint; says whether the batch of that step was finite itself."""
        bad = int(accelerator.gather(first_bad.reshape(1)).min())
        weights = bad > num_steps and saving and not finite_weights(model)
        if bad <= num_steps or weights:
            step = bad if bad <= num_steps else done
            batch = prepare(step - 1)  # the same batch again: the stream is seeded by step
            data_finite = bool(batch.x0.isfinite().all() and batch.context.isfinite().all())
            raise TrainingDiverged(step, data_finite, weights)

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # per-sample losses and timesteps not yet in the history
    first_bad = torch.full((), num_steps + 1, dtype=torch.long, device=device)  # the first step whose loss was not finite, on the device
    started = time.perf_counter()
    progress = tqdm(range(first_step, num_steps), desc="train", initial=first_step, total=num_steps, mininterval=5, disable=not main)
    inputs = Prefetch(prepare, range(first_step, num_steps), pin=on_gpu)
    with StopFlag() as stop, contextlib.closing(inputs):
        for step, batch in zip(progress, inputs):
            # Evaluate the loss and accumulate gradients: d/dtheta of the mean over the global batch
            # (DDP averages over processes, hence the factor num_processes).
            x0, context = batch.x0.to(device, non_blocking=True), batch.context.to(device, non_blocking=True)
            draws = {key: value.to(device, non_blocking=True) for key, value in batch.draws.items()}
            optimizer.zero_grad(set_to_none=True)
            for k, micro in enumerate(plan.micro_batches()):
                sync = accelerator.no_sync(model) if k < plan.accumulation - 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():
                        per_sample, logs = loss_fn(denoiser, x0[micro], context[micro], **{key: value[micro] for key, value in draws.items()})
                    accelerator.backward(per_sample.sum() * plan.num_processes / plan.global_batch)
                pending.append((per_sample.detach().float(), logs["t"]))
                first_bad = torch.where(per_sample.detach().isfinite().all(), first_bad, first_bad.clamp(max=step + 1))  # no host sync
            optimizer.step()

            # Update the EMA (Section 4: decay 0.9995 at the paper's scale).
            if main:
                update_ema(ema, accelerator.unwrap_model(model), train_config.ema_decay)

            # Log, preview, checkpoint: the losses reach the host only at these steps.
            done = step + 1
            stopping = stop.agreed(accelerator)
            saving = checkpoints and (done % train_config.checkpoint_every_steps == 0 or done == num_steps or stopping)
            logging_now = done % train_config.log_every_steps == 0 or done == num_steps
            if logging_now or saving:
                check_finite(done, saving or done == num_steps)
                flush_losses()
            if main:
                if logging_now:
                    points = history.flush(done)
                    progress.set_postfix(loss=f"{points['loss'][1]:.4f}")
                    monitor.logged(done, points)
                if train_config.preview_every_steps and done % train_config.preview_every_steps == 0 and done < num_steps:
                    monitor.preview(done, ema)
            if saving:
                if main:
                    meta = {"history": history.state_dict(), "train_seconds": seconds_before + time.perf_counter() - started}
                    checkpoints.save(done, accelerator.unwrap_model(model), ema, optimizer.optimizer, meta)
                accelerator.wait_for_everyone()
            if stopping:
                raise TrainingInterrupted(done)
    accelerator.wait_for_everyone()
    if main and train_config.channels_last:
        ema.to(memory_format=torch.contiguous_format)  # the layout of the saved pipeline (safetensors stores contiguous tensors)
    seconds_per_step = (seconds_before + time.perf_counter() - started) / num_steps  # over all runs of the stage
    return TrainResult(ema, history if main else None, seconds_per_step, first_step, inputs.waited_s)
