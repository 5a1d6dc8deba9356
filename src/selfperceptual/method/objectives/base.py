"""What an objective is: its settings, the model it trains, its loss, its saved pipeline, its FLOPs.

An objective is a subclass of ``Objective`` registered under its name (``register``); training,
model I/O, the DAG, the cost model and the benchmarks ask the registry (``get``) and never branch
on a name. The built-in ones are ``mse`` (Eq. 4), ``sp`` (Eq. 11, the paper's) and the peers
``lpl`` and ``casdm``; another package adds its own through the entry-point group
``selfperceptual.objectives`` (docs/method.md: adding an objective).

This module and the plug-ins import no torch: the config and the DAG read them in every stage's
start-up. What an objective builds (its loss: a small callable
``loss(denoiser, x0, context, **draws) -> (per_sample, logs)`` with ``draw(x0, generators)``,
``to`` and ``compile``; its model; its pipeline) is imported when it builds it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UnknownObjective


class ObjectiveSettings(BaseModel):
    """The settings every objective has (params.yaml ``train.<name>``); an objective's own extend them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_steps: int = Field(gt=0)
    condition_dropout: float = Field(ge=0.0, le=1.0)
    learning_rate: float = Field(gt=0)
    # Memory, not the method: an objective whose step needs more memory per sample than MSE's takes
    # smaller micro-batches (null: train.max_per_device_batch), or recomputes the UNet's activations
    # in the backward pass instead of keeping them (diffusers' gradient checkpointing).
    max_per_device_batch: int | None = Field(None, gt=0, json_schema_extra={"affects": "memory"})
    gradient_checkpointing: bool = Field(False, json_schema_extra={"affects": "memory"})


# FLOPs per image of the networks of a step (pipeline.cost.network_flops), by part: "unet_train"
# (the online UNet's forward and backward), "frozen_forward" and "frozen_branch" (f*_l without a
# graph, and forward plus input-gradient backward), "vae_decode", "decode_branch", "vgg_forward",
# "vgg_branch". ``counts(layer)`` gives them with f* truncated at ``layer``.
FlopCounts = Callable[..., dict[str, float]]


class Objective:
    """One training objective. The defaults are one UNet trained as a denoiser and saved as a
    StableDiffusionPipeline; an objective that trains more (Cas-DM) overrides what differs."""

    name: ClassVar[str]
    label: ClassVar[str]  # as tables write it
    summary: ClassVar[str] = ""  # one sentence for the report: what it adds to the MSE loss
    settings: ClassVar[type[ObjectiveSettings]] = ObjectiveSettings
    # Stage folders the loss reads besides the data and the starting model: name -> what it is.
    inputs: ClassVar[dict[str, str]] = {}
    # Settings that name local files (weights), by key of its settings: where to get each.
    files: ClassVar[dict[str, str]] = {}
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"  # the _class_name of its saved pipelines
    components: ClassVar[tuple[str, ...]] = ("unet",)  # the pipeline components training writes
    long_running: ClassVar[bool] = False  # its jobs start first (the longest of a pipeline's)

    def needs(self, settings) -> dict[str, str]:
        """The inputs this objective needs with these settings (``inputs`` unless some are optional)."""
        return dict(self.inputs)

    def default_sources(self, settings) -> dict[str, str]:
        """Stages of the DAG that provide an input unless a training run names another."""
        return {}

    def files_in_use(self, settings) -> dict[str, str | None]:
        """The paths of ``files`` these settings use (key -> path)."""
        return {key: getattr(settings, key) for key in self.files}

    def trained_model(self, pipeline, schedule):
        """What training updates, made from the starting pipeline."""
        return pipeline.unet

    def networks(self, model) -> tuple:
        """The UNets inside ``model`` (gradient checkpointing and torch.compile apply to each)."""
        return (model,)

    def denoiser(self, model):
        """What the loss calls: (x_t, t, context) -> v_hat (or what the loss expects of ``model``)."""
        from ..unet import Denoiser

        return Denoiser(model)

    def loss(self, settings, schedule, pipeline, inputs: dict[str, Path]):
        """The loss callable; ``pipeline`` holds the starting model's components (unet, vae)."""
        raise NotImplementedError

    def pipeline(self, model, **components):
        """A pipeline that samples ``model`` (vae, text_encoder, tokenizer, scheduler given)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(unet=model, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components)

    def pipeline_type(self):
        """The class that loads its saved pipelines (``from_pretrained``)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def save(self, model, folder: Path) -> None:
        """Writes ``components`` of a pipeline folder whose other components are in place."""
        model.save_pretrained(folder / "unet", safe_serialization=True)

    def flops_per_image(self, counts: FlopCounts, settings, num_train_timesteps: int) -> float:
        """FLOPs of one training sample's forward and backward."""
        return counts()["unet_train"]

    def tags(self, settings, inputs: dict[str, Path]) -> dict[str, str]:
        """The settings a run's tracker records as tags (what the tables compare)."""
        return {}

    def source_files(self) -> list[Path]:
        """Its code: a checkpoint resumes only under the same (pipeline.checkpoints.code_version)."""
        return [Path(inspect.getfile(type(self)))]


_REGISTRY: dict[str, Objective] = {}
_ENTRY_POINTS_LOADED = False


def register(objective: Objective | type[Objective]):
    """Adds an objective (an instance, or a class made with no arguments); usable as a class decorator."""
    instance = objective() if isinstance(objective, type) else objective
    _REGISTRY[instance.name] = instance
    return objective


def registered() -> dict[str, Objective]:
    """Every objective by name: the built-in ones, those of installed plug-ins, those registered since."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        from importlib.metadata import entry_points

        for point in entry_points(group="selfperceptual.objectives"):
            register(point.load())
    return dict(_REGISTRY)


def names() -> list[str]:
    return list(registered())


def get(name: str) -> Objective:
    objectives = registered()
    if name not in objectives:
        raise UnknownObjective(name, list(objectives))
    return objectives[name]


def saving(pipeline_class: str) -> Objective | None:
    """The objective whose saved pipelines have this ``_class_name``; None for StableDiffusionPipeline's."""
    return next((o for o in registered().values() if o.pipeline_class == pipeline_class and pipeline_class != Objective.pipeline_class), None)
