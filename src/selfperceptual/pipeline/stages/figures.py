"""figures: the paper's Figures 3-6 at this scale, with column headings in the images, and the
training loss curves.

- Fig. 3/4 (``fig3_4.png``): MSE | SP | MSE+CFG, 50 NFEs each (MSE and SP 50 DDIM steps; MSE with
  CFG 7.5 and rescale 0.7, 25 steps), same seed per row; the DrawBench prompts of the paper's
  figures (``figures.prompts: drawbench``) or held-out eval captions.
- Fig. 5 (``fig5_uncond.png``): the unconditional MSE and SP models, ``figures.uncond_steps``
  DDIM steps (the paper's 1000), same seeds.
- Fig. 6 (``fig6_x0.png``): the model's x0 prediction at t = 1000, 900, ..., 100 and the final
  image, for MSE, MSE+CFG and SP, same seed and caption: a 10-step DDIM, whose trailing
  timesteps are exactly those t; the prediction is the scheduler's own ``pred_original_sample``.
- ``loss_curves.png``: the training loss of the four main runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import pandas as pd
import torch

from .. import tracking
from ...method.device import runtime
from ..experiments import DRAWBENCH_FIGURE_PROMPTS, SAMPLE_ROWS
from ..io import read_json, write_json
from ...method.models import load_stage_pipeline
from ...method.sampling import generate, grid

matplotlib.use("Agg")
from matplotlib import pyplot

log = logging.getLogger("figures")
PARAMS = ("figures", "sample.precision")
MODELS = ("mse", "sp", "uncond_mse", "uncond_sp")  # --<flag>: the training stage whose pipeline it is
X0_STEPS = 10  # t = 1000, 900, ..., 100 with trailing spacing
MIN_SIDE = 128  # small-scale samples are enlarged so they can be seen


def add_arguments(parser) -> None:
    for flag in MODELS:
        parser.add_argument(f"--{flag}", type=Path, required=True, help=f"the {flag.replace('_', ' ')} training stage's folder")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus stage's folder (eval captions)")


def prompts(config, corpus: Path) -> list[str]:
    settings = config.figures
    if settings.prompts == "drawbench":
        return list(DRAWBENCH_FIGURE_PROMPTS[: settings.num_prompts])
    return pd.read_parquet(corpus / "eval.parquet")["caption"].tolist()[: settings.num_prompts]  # held out from training


@contextmanager
def recording_x0(pipeline):
    """Collects the scheduler's x0 prediction (``pred_original_sample``) at each step."""
    predictions, step = [], pipeline.scheduler.step

    def recorded(*args, **kwargs):
        output = step(*args, **kwargs)
        predictions.append(output[1] if isinstance(output, tuple) else output.pred_original_sample)
        return output

    pipeline.scheduler.step = recorded
    try:
        yield predictions
    finally:
        del pipeline.scheduler.step  # the class's method again


@torch.no_grad()
def x0_trajectory(pipeline, prompt: str, seed: int, cfg: float | None, rescale: float | None) -> tuple[list[str], list]:
    """Column headings and images: the decoded x0 prediction at each of the X0_STEPS steps, then the final image."""
    with recording_x0(pipeline) as predictions:
        final = generate(pipeline, [prompt], [seed], X0_STEPS, cfg, rescale)[0]
    vae = pipeline.vae
    decoded = [vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample for latents in predictions]
    images = [pipeline.image_processor.postprocess(image.float(), output_type="pil")[0] for image in decoded]
    headings = [f"t={int(t) + 1}" for t in pipeline.scheduler.timesteps] + ["final"]
    return headings, [*images, final]


def loss_curves(training: dict[str, Path], path: Path) -> None:
    figure, axes = pyplot.subplots(figsize=(7, 4))
    for name, folder in training.items():
        steps, values = zip(*[(point[0], point[1]) for point in read_json(folder / "loss_curve.json")["loss"]], strict=True)
        axes.plot(steps, values, label=name)
    axes.set(xlabel="training step", ylabel="loss (mean over each logging window)", yscale="log",
             title="Training loss (the MSE and SP objectives measure different things)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run(args, config, scale, out) -> None:
    settings, device = config.figures, runtime(config.sample.precision)
    models = {flag: getattr(args, flag) for flag in MODELS}
    pipelines = {flag: load_stage_pipeline(flag, folder, device) for flag, folder in models.items()}
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(disable=True)
    guided = SAMPLE_ROWS["mse_cfg75_r07_s25"]

    text = prompts(config, args.corpus)
    seeds = [settings.seed + position for position in range(len(text))]
    columns = [
        generate(pipelines["mse"], text, seeds, 50, None, None),
        generate(pipelines["sp"], text, seeds, 50, None, None),
        generate(pipelines["mse"], text, seeds, guided.steps, guided.cfg, guided.rescale),
    ]
    grid(columns, min_side=MIN_SIDE, headings=["MSE", "SP", "MSE+CFG"]).save(out / "fig3_4.png")

    empty, uncond_seeds = [""] * settings.uncond_images, [settings.seed + i for i in range(settings.uncond_images)]
    columns = [generate(pipelines[flag], empty, uncond_seeds, settings.uncond_steps, None, None) for flag in ("uncond_mse", "uncond_sp")]
    grid(columns, min_side=MIN_SIDE, headings=["MSE", "SP"]).save(out / "fig5_uncond.png")

    rows, labels, headings = [], [], []
    for prompt, seed in zip(text[: settings.x0_prompts], seeds, strict=False):
        for label, flag, cfg, rescale in (("MSE", "mse", None, None), ("MSE+CFG", "mse", guided.cfg, guided.rescale), ("SP", "sp", None, None)):
            headings, images = x0_trajectory(pipelines[flag], prompt, seed, cfg, rescale)
            rows.append(images)
            labels.append(label)
    grid([list(column) for column in zip(*rows, strict=True)], min_side=MIN_SIDE, headings=headings, row_labels=labels).save(out / "fig6_x0.png")

    loss_curves({name: models[flag] for name, flag in (("MSE", "mse"), ("SP", "sp"), ("MSE, uncond.", "uncond_mse"), ("SP, uncond.", "uncond_sp"))},
                out / "loss_curves.png")
    summary = {"fig3_4_prompts": text, "fig3_4_seeds": seeds, "fig5_steps": settings.uncond_steps, "fig6_prompts": text[: settings.x0_prompts],
               "fig6_timesteps": headings, "guidance": {"cfg": guided.cfg, "rescale": guided.rescale, "steps": guided.steps}}
    write_json(out / "figures.json", summary)
    log.info("figures: %s", ", ".join(sorted(path.name for path in out.glob("*.png"))))
    images = sorted(out.glob("*.png"))
    return lambda: tracking.log_run(scale, stage=args.out.name, params={"figures": settings.model_dump()},
                                    tags={"kind": "figures"}, images=[args.out / path.name for path in images])
