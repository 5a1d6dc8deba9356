"""train: fine-tune the UNet with the MSE objective (Eq. 4), the self-perceptual one (Eq. 11), or a peer's (LPL, Cas-DM).

Everything the stage loads (``--init``, ``--perceptual``, ``--data``) is loaded and checked before
the first step. Training checkpoints every ``train.checkpoint_every_steps`` into ``--checkpoints``
(outside the output folder, so a failed job never loses them) and on SIGTERM; running the stage
again after it was stopped resumes from the latest checkpoint, bit for bit, in the same MLflow run.
After it finished, running it again (forced, or its inputs remade) trains anew in a new run. The
output folder (EMA pipeline, loss curve, metrics, preview) is written before MLflow hears of the end
of the run, so a tracking failure costs nothing but a rerun, which trains no further and only reports.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import tracking, warm
from ..checkpoints import CheckpointStore, fingerprint
from ..config import TrainConfig, settings_affecting
from ...method.device import peak_memory_mib, runtime
from ..distributed import launch_command
from ..experiments import peer_tags
from ..io import Busy, hold_exclusively, read_json, write_json, write_series_csv
from ..sheets import sheet
from ...method import objectives
from ...method.errors import SettingError
from ...method.models import assemble_pipeline, load_stage_pipeline, save_trained
from ...method.sampling import generate
from ...method.schedule import Schedule
from ..training import LatentData, Monitor, TrainingDiverged, TrainingInterrupted, train

log = logging.getLogger("train")
# Its params come from the TrainRun it runs (experiments.TrainRun.params(): what each setting affects, config.AFFECTS).
PARAMS = None
PREVIEW_IMAGES = 8
EXIT_SIGTERM = 143  # 128 + SIGTERM: what a job killed at its time limit reports


def add_arguments(parser) -> None:
    parser.add_argument("--data", type=Path, action="append", required=True, help="an encode stage's folder (repeat for each part, in order)")
    parser.add_argument("--init", type=Path, required=True, help="folder whose pipeline/ is the starting model")
    registered = objectives.registered()
    for name, objective in registered.items():  # the inputs an objective reads besides the data and --init
        for flag, what in objective.inputs.items():
            parser.add_argument(f"--{flag}", type=Path, help=f"{what} ({name})")
    parser.add_argument("--objective", choices=list(registered), required=True)
    parser.add_argument("--steps-of", choices=list(registered), help="train for this objective's num_steps at its learning_rate (the peers' MSE control)")
    parser.add_argument("--conditioning", choices=("text", "uncond"), required=True)
    parser.add_argument("--checkpoints", type=Path, required=True, help="where training state is kept across failures and resumes (never an output folder)")


def launcher(argv: list[str], config) -> list[str] | None:
    """One process per GPU this job was given, on every node of its allocation (distributed.py)."""
    return launch_command(argv, torch.cuda.device_count())


def _made(folder: Path) -> str:
    """When and as what a stage's output folder was put in place (outputs are renamed in whole)."""
    stat = folder.stat()
    return f"{stat.st_ino}-{stat.st_mtime_ns}"


def check_data(data: LatentData, unet, folders: list[Path]) -> None:
    """The cached latents and text embeddings fit the model (channels, text width)."""
    x0, context = data.batch([torch.Generator().manual_seed(0)], 0.0, "text")
    channels, width = unet.config.in_channels, unet.config.cross_attention_dim
    if x0.shape[1] != channels or context.shape[-1] != width:
        raise SystemExit(
            f"--data {', '.join(map(str, folders))}: latents with {x0.shape[1]} channels and text embeddings {context.shape[-1]} wide, "
            f"but the model takes {channels} channels and {width}-wide text; encode with this model's base"
        )


class StageMonitor(Monitor):
    """Live tracking and preview grids of the EMA model, from the training loop."""

    def __init__(self, run: tracking.LiveRun, pipeline, prompts: list[str], precision: str, folder: Path, objective: str, name: str):
        self.run, self.pipeline, self.prompts, self.folder, self.objective, self.name = run, pipeline, prompts, folder, objective, name
        self.device = runtime(precision)
        for module in (pipeline.vae, pipeline.text_encoder):  # fp32, run under autocast in the preview's precision
            module.to(self.device.device)

    def logged(self, step: int, points: dict) -> None:
        self.run.log_points({key: [point] for key, point in points.items()})

    @torch.no_grad()
    def render(self, ema, path: Path, step: int) -> Path:
        """A sheet of the EMA model's samples at ``step`` (25 DDIM steps, no CFG), the preview's seeds 0..7, captioned."""
        pipeline = assemble_pipeline(self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.tokenizer, ema, self.pipeline.scheduler, self.objective)
        pipeline.set_progress_bar_config(disable=True)
        low_precision = self.device.dtype != torch.float32
        with torch.autocast(self.device.device.type, dtype=self.device.dtype, enabled=low_precision):
            images = generate(pipeline, self.prompts, list(range(len(self.prompts))), steps=25, cfg=None, rescale=None)
        captions = [f"seed {seed}: {prompt or '(empty prompt)'}" for seed, prompt in enumerate(self.prompts)]
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet(images, captions, f"{self.name}, step {step}: the EMA model's samples (25 DDIM steps, no CFG)").save(path)
        return path

    def preview(self, step: int, ema) -> None:
        self.run.log_image("preview", self.render(ema, self.folder / "previews" / f"preview_step{step:08d}.png", step), step)


DIVERGED = "diverged.json"  # in an execution's checkpoint folder: its training stopped on a non-finite loss


def diverged_message(stopped: TrainingDiverged, args, config, settings_of, store: CheckpointStore) -> str:
    """What stopped, what was kept, and the likely cause: the data when that step's batch was not
    finite itself, else the learning rate or the precision."""
    latest = store.latest()
    kept = f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint was made before it"
    if not stopped.data_finite:
        cause = (f"that step's batch is not finite itself: the latents in --data {', '.join(map(str, args.data))} hold NaN or inf "
                 "(encode them again)")
    else:
        cause = (f"likely the learning rate (train.{args.objective}.learning_rate = {settings_of.learning_rate:g}) or the precision "
                 f"(train.precision = {config.train.precision}{'; fp16 overflows where bf16 does not' if config.train.precision == 'fp16' else ''})")
    return f"train: {stopped}; nothing of it was saved and {kept}; {cause}"


def run(args, config, scale, out):
    """``out`` is None on the processes of a multi-GPU launch other than the first: they train, the first writes."""
    # Load and check everything before the first step.
    schedule = Schedule.from_config(config.schedule)
    objective = objectives.get(args.objective)
    settings_of = config.train.objective(args.objective)
    inputs = {name: getattr(args, name) for name in objective.needs(settings_of)}
    for name, what in objective.needs(settings_of).items():
        if inputs[name] is None:
            raise SystemExit(f"--objective {args.objective} needs --{name} ({what})")
    init = load_stage_pipeline("init", args.init)  # every component loaded now: a broken file fails before the first step
    model = objective.trained_model(init, schedule)  # the UNet, or Cas-DM's two modules
    data = LatentData(args.data)
    check_data(data, init.unet, args.data)
    try:
        loss_fn = objective.loss(settings_of, schedule, init, inputs)
    except SettingError as error:
        raise SystemExit(f"train.{args.objective}.{error.setting}: {error.problem}") from error
    if args.steps_of:
        borrowed = config.train.objective(args.steps_of)
        settings_of = settings_of.model_copy(update={"num_steps": borrowed.num_steps, "learning_rate": borrowed.learning_rate})
    settings = {
        "objective": args.objective, "conditioning": args.conditioning, "train": config.train.model_dump(), "schedule": config.schedule.model_dump(),
        "init": str(args.init.resolve()), **{name: str(path.resolve()) if path else None for name, path in inputs.items()},
        "steps_of": args.steps_of, "data": [str(folder.resolve()) for folder in args.data], "num_samples": len(data),
    }
    for key in settings_affecting(TrainConfig, "record", "memory", "bookkeeping"):
        settings["train"].pop(key)  # they change what is logged and kept, or the memory used, not what is trained
    for section in settings["train"].values():
        if isinstance(section, dict):  # an objective's
            for key in settings_affecting(objectives.ObjectiveSettings, "memory"):
                section.pop(key)
    # The inputs as they are now: a rerun of the stage that made one gives a new folder, so a changed
    # input never resumes from checkpoints trained on the old one (the paths alone would).
    settings["made"] = {str(path): _made(path) for path in (args.init, *inputs.values(), *args.data) if path}
    configuration = args.checkpoints / fingerprint(settings)
    if out is not None:  # one process of a launch trains into a configuration's checkpoints at a time
        try:
            _held = hold_exclusively(configuration / "train.lock", f"train --out {args.out}")  # until finished, or the process ends
        except Busy as busy:
            raise SystemExit(f"train: the checkpoints in {configuration} are being trained into by another process "
                             f"({busy.holder}); wait for it to end, or stop it") from None
    store = CheckpointStore.for_execution(configuration, config.train.keep_checkpoints)
    diverged = store.folder / DIVERGED
    if diverged.is_file():  # Snakemake's retries, or a rerun with the same settings: the same steps would diverge again
        raise SystemExit(f"{read_json(diverged)['message']} (found by an earlier attempt: {diverged}; change the settings, "
                         "or delete that file to try the same ones again)")
    log.info("train %s/%s: %d steps of %d on %d samples; checkpoints in %s", args.objective, args.conditioning,
             settings_of.num_steps, config.train.global_batch, len(data), store.folder)

    run_ = monitor = None
    if out is not None:
        run_ = tracking.LiveRun(
            scale,
            stage=args.out.name,
            params={"objective": args.objective, "conditioning": args.conditioning, "steps_of": args.steps_of, "overrides": " ".join(args.overrides),
                    "train": config.train.applying_to(args.objective, settings_of), "schedule": config.schedule.model_dump()},
            tags={"objective": args.objective, "conditioning": args.conditioning, "kind": "train", "process": "served" if warm.SERVED else "new",
                  **objective.tags(settings_of, inputs), **peer_tags(args.out.name)},
            state_file=store.folder / "mlflow_run.json",
        )
        prompts = data.captions(PREVIEW_IMAGES) if args.conditioning == "text" else [""] * PREVIEW_IMAGES
        monitor = StageMonitor(run_, init, prompts, config.sample.precision, store.folder, args.objective, args.out.name)

    # Train.
    try:
        result = train(model, data, loss_fn, settings_of, config.train, args.conditioning, schedule.num_train_timesteps, store, monitor, args.objective)
    except TrainingDiverged as stopped:
        if run_:
            run_.end("FAILED")
        message = diverged_message(stopped, args, config, settings_of, store)
        if out is not None:
            write_json(diverged, {"step": stopped.step, "message": message})
        raise SystemExit(message) from None
    except TrainingInterrupted as stopped:
        if run_:
            run_.end("KILLED")
        log.warning("%s; run the stage again to resume", stopped)
        raise SystemExit(EXIT_SIGTERM) from None
    except BaseException:
        if run_:
            run_.end("FAILED")
        raise
    if out is None:
        return None

    # Write the results, then report them once they are in place.
    save_trained(args.init / "pipeline", result.ema, out / "pipeline", args.objective)
    monitor.render(result.ema, out / "preview.png", settings_of.num_steps)
    history = result.history
    metrics = {"final_loss": history.final(), "seconds_per_step": result.seconds_per_step, "resumed_from_step": result.first_step,
               "num_steps": settings_of.num_steps, "peak_memory_mib": peak_memory_mib()}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    # The objective's settings this model was trained with (the report's peers table states them).
    write_json(out / "settings.json", settings_of.model_dump(exclude=set(settings_affecting(objectives.ObjectiveSettings, "memory"))))
    write_json(out / "loss_curve.json", history.series)
    write_series_csv(history.series, out / "loss.csv")  # the same points as a table: DVC's plots
    if run_.run_id:  # what the runs that evaluate this model link to: the run, and the model MLflow records it made
        model_id = run_.record_model(args.out.name, settings_of.num_steps, {"objective": args.objective, "conditioning": args.conditioning})
        write_json(out / "tracking.json", {"run_id": run_.run_id, "model_id": model_id, "tracking_uri": tracking.tracking_uri()})

    def report() -> None:
        run_.end("FINISHED", metrics=metrics, series=history.series, images={"preview": (args.out / "preview.png", settings_of.num_steps)})
        run_.raise_if_failed()
        store.finish({"run_id": run_.run_id, "out": str(args.out), "steps": settings_of.num_steps})
        _held.close()  # held until the execution is marked finished

    return report
