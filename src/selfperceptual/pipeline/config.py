"""Typed, validated configuration read from ``params.yaml``.

``params.yaml`` holds ``scale`` (which block is in force) and one block per scale (``smoke``,
``local``, ``rehearsal``, ``workstation``, ``paper``). Every block has the same schema; ``local`` and
``paper`` are written in full, and the others merge one of them (YAML merge keys) and write only
what they change. Unknown keys and wrong types are errors that name the dotted key.

    python -m selfperceptual.pipeline.config show smoke [--set KEY=VALUE ...]   # a scale, resolved
    python -m selfperceptual.pipeline.config schema workflow/schemas/params.schema.json
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ..method import objectives

SCALES = ("smoke", "local", "rehearsal", "workstation", "paper")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CorpusConfig(Section):
    """Where the raw data comes from.

    ``synthetic`` builds a LAION-schema corpus offline; ``external`` reads a LAION metadata
    parquet and MSCOCO-2014 captions from the given paths (the paper scale).
    """

    source: Literal["synthetic", "external"]
    seed: int = 0
    num_train_rows: int = Field(gt=0)
    num_eval_captions: int = Field(gt=0)
    num_featnet_images: int = Field(ge=0)
    min_source_side: int = Field(gt=0)
    max_source_side: int = Field(gt=0)
    broken_fraction: float = Field(ge=0.0, lt=1.0)
    laion_parquet: str | None = None
    coco_captions: str | None = None
    coco_images: str | None = None


class FilterConfig(Section):
    min_aesthetic: float  # rows kept when AESTHETIC_SCORE > min_aesthetic
    min_side: int  # rows kept when min(WIDTH, HEIGHT) > min_side
    max_punsafe: float | None = None
    max_pwatermark: float | None = None


class DownloadConfig(Section):
    resolution: int = Field(gt=0)
    num_jobs: int = Field(1, gt=0)  # split into this many jobs (contiguous blocks of rows); same result
    processes: int = Field(gt=0)
    threads: int = Field(gt=0)
    shard_size: int = Field(gt=0)
    timeout_s: int = Field(gt=0)
    # The URL schemes fetched; others are refused and counted. null: http and https where the metadata
    # came from outside (corpus.source external), anything for the synthetic corpus's own images.
    url_schemes: list[str] | None = None


class TinyVaeConfig(Section):
    block_out_channels: list[int]
    latent_channels: int = 4
    norm_num_groups: int
    train_steps: int = Field(ge=0)
    train_crop: int = Field(gt=0)  # trains on random square crops: the VAE is convolutional
    batch: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    kl_weight: float = Field(ge=0)


class TinyTextConfig(Section):
    hidden_size: int
    num_layers: int
    num_heads: int
    max_length: int


class TinyUNetConfig(Section):
    block_out_channels: list[int]
    layers_per_block: int
    attention_heads: int  # heads per attention layer (diffusers calls it attention_head_dim); few, wide heads run fastest on CPUs
    norm_num_groups: int


class BaseModelConfig(Section):
    """``pretrained`` is a local path or hub id (paper: SD 2.1-base); null builds the tiny model."""

    pretrained: str | None
    seed: int = 0
    vae: TinyVaeConfig | None = None
    text: TinyTextConfig | None = None
    unet: TinyUNetConfig | None = None

    @model_validator(mode="after")
    def _tiny_needs_settings(self):
        missing = [name for name in ("vae", "text", "unet") if self.pretrained is None and getattr(self, name) is None]
        if missing:
            raise ValueError(f"pretrained is null, so the tiny model's {', '.join(missing)} settings are required")
        return self


Precision = Literal["fp32", "fp16", "bf16"]


class EncodeConfig(Section):
    batch: int = Field(gt=0)
    precision: Precision  # of the VAE and text encoder (stored: float32 latents, float16 text embeddings)
    shard_size: int = Field(gt=0)  # samples per shard file: encode's memory and training's read unit
    num_jobs: int = Field(1, gt=0)  # split into this many jobs (contiguous blocks of batches); same result


class TinyClipConfig(Section):
    """The tiny CLIP the clip stage trains where no CLIP weights exist (tinyclip.py): both towers
    ``width`` wide and ``layers`` deep, images cut into ``patch``-pixel patches."""

    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    patch: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    train_steps: int = Field(ge=0)
    batch: int = Field(gt=1)
    learning_rate: float = Field(gt=0)


class ClipConfig(Section):
    """The CLIP of the data stages: clip-retrieval's image and text embeddings of the downloaded
    shards, and the aesthetic re-scoring. ``model``: a Hugging Face CLIP folder, or a hub id in the
    local cache (paper: openai/clip-vit-large-patch14); null: the clip stage trains ``tiny`` on the
    downloaded images and captions."""

    model: str | None
    tiny: TinyClipConfig | None = None
    batch: int = Field(gt=0)  # clip-retrieval inference batch

    @model_validator(mode="after")
    def _tiny_needs_settings(self):
        if self.model is None and self.tiny is None:
            raise ValueError("model is null, so the tiny CLIP's settings (tiny) are required")
        return self


class AestheticConfig(Section):
    """The LAION aesthetic predictor (aesthetics.py) over the CLIP image embeddings. ``weights``: its
    weights file (paper: sac+logos+ava1-l14-linearMSE.pth); null: the aesthetic_train stage fits the
    same architecture, ``hidden`` wide, to corpus images' AESTHETIC_SCORE."""

    weights: str | None
    weights_sha256: str | None = None  # the weights file's SHA-256 (or its leading hex digits) where one is published; null: unchecked
    hidden: list[int]
    train_rows: int = Field(ge=0)  # corpus images it is fitted on (null weights)
    train_steps: int = Field(ge=0)
    batch: int = Field(gt=0)
    learning_rate: float = Field(gt=0)


class ScheduleConfig(Section):
    beta_start: float
    beta_end: float
    num_train_timesteps: int = Field(gt=1)


def affects(kind: str, **field):
    """A setting's field, marked with what it changes (``AFFECTS``)."""
    return Field(json_schema_extra={"affects": kind}, **field)


# What a training setting changes; the DAG (the params a training stage depends on) and the
# checkpoints (what a checkpoint may resume under) both read it. Unmarked settings change the weights.
AFFECTS = {
    "weights": "what is trained: the stage reruns when it changes, and a checkpoint resumes only under the same",
    "record": "what the stage writes beside the weights (the loss curve): it reruns, a checkpoint still resumes",
    "speed": "the weights within float noise only: the stage does not rerun, but checkpoints are kept apart",
    "memory": "how a step is split or recomputed: neither",
    "bookkeeping": "what is kept and shown while it trains: neither",
    "plan": "which stages the DAG has",
}


def settings_affecting(model: type[BaseModel], *kinds: str) -> list[str]:
    """The fields of ``model`` marked with one of ``kinds`` (unmarked: "weights")."""
    return [name for name, field in model.model_fields.items() if (field.json_schema_extra or {}).get("affects", "weights") in kinds]


class TrainConfig(Section):
    seed: int = 0
    seeds: int = affects("plan", default=1, gt=0)  # the Table 1 and 8 runs are trained with seeds seed, seed+1, ...; the report's intervals are over them
    global_batch: int = Field(gt=0)  # samples per optimiser step, whatever the number of GPUs
    max_per_device_batch: int = affects("memory", gt=0)  # memory cap: gradient accumulation makes up the rest
    precision: Precision  # of the forward and backward passes (autocast); weights, optimizer and EMA stay fp32
    ema_decay: float = Field(ge=0.0, lt=1.0)
    log_every_steps: int = affects("record", gt=0)  # loss curve points, on disk and in MLflow as training goes
    preview_every_steps: int = affects("bookkeeping", ge=0)  # a preview grid of the EMA model in MLflow (0: only at the end)
    checkpoint_every_steps: int = affects("bookkeeping", gt=0)  # training state saved for resuming (also at the end and on SIGTERM)
    keep_checkpoints: int = affects("bookkeeping", gt=0)  # the latest this many are kept
    # Speed, not the method (docs/speed.md): the same losses within float noise.
    compile: bool = affects("speed", default=False)  # torch.compile the UNet(s) being trained and SP's f*
    channels_last: bool = affects("speed", default=False)  # NHWC convolutions in the networks of the step (tensor cores' layout)
    # Then one section per registered objective, its settings (method.objectives: train.mse, train.sp,
    # train.lpl, train.casdm and any plug-in's), added by scale_model().

    def objective(self, name: str):
        """The settings of objective ``name`` (``train.<name>``)."""
        settings = getattr(self, name, None)
        if settings is None:
            raise ParamsError(f"train.{name}: the scale block has no settings for objective {name!r}")
        return settings

    def applying_to(self, name: str, settings=None) -> dict:
        """What a run of objective ``name`` is trained with: the common settings and that
        objective's own (``settings``: as the run uses them), not the other objectives'."""
        common = {key: value for key, value in self.model_dump().items() if key not in objectives.names()}
        return {**common, name: (settings if settings is not None else self.objective(name)).model_dump()}


class FeatNetConfig(Section):
    """The evaluation feature network: ``tiny`` is trained on held-out real corpus images,
    ``inception`` is torch-fidelity's Inception-v3 with the weights file ``inception_weights``
    (paper scale; docs/scales.md says where to get it)."""

    kind: Literal["tiny", "inception"]
    train_steps: int = Field(ge=0)
    batch: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    feature_dim: int = Field(gt=0)
    inception_weights: str | None = None
    # Its published SHA-256, or the leading hex digits torch hub file names carry (weights-inception-2015-12-05-6726825d.pth); null: unchecked.
    inception_sha256: str | None = None

    @model_validator(mode="after")
    def _weights_named(self):
        if self.kind == "inception" and not self.inception_weights:
            raise ValueError("kind 'inception' needs inception_weights: the path of torch-fidelity's Inception-v3 weights file")
        return self


class SampleConfig(Section):
    num_images: int = Field(gt=0)
    batch: int = Field(gt=0)
    precision: Precision  # of the pipeline's models while sampling (also the training preview's)
    num_jobs: int = Field(1, gt=0)  # split each sampling row into this many jobs (blocks of batches); same images
    seed: int = 0
    eta: float = 0.0


class EvaluateConfig(Section):
    is_splits: int = Field(gt=0)
    batch: int = Field(gt=0)
    bootstrap: int = Field(ge=0)  # resamples of the generated images for FID's 95% interval (0: none)
    precision: Precision  # of the feature network when it extracts features (featnet and evaluate)
    # Text alignment as CLIP score (Hessel et al. 2021, as torchmetrics computes it) with this CLIP
    # model: a local folder or a hub id in the local Hugging Face cache. None: the fraction of samples
    # whose caption's label the evaluation classifier recognises (the synthetic corpus's labels).
    clip: str | None = None


class AuthorsConfig(Section):
    """The authors' released checkpoints (hub ids or local folders), sampled and evaluated with
    the Table 1 rows of their objective; absent at the small scales."""

    mse: str
    sp: str


class FiguresConfig(Section):
    """The paper's Figures 3-6 (the figures stage), each sampled with seeds ``seed``, ``seed`` + 1, ..."""

    prompts: Literal["eval_captions", "drawbench"]  # Fig. 3/4: held-out eval captions, or the DrawBench prompts of the paper's Fig. 3 and 4
    num_prompts: int = Field(gt=0)  # Fig. 3/4: rows (at most 24 DrawBench prompts)
    uncond_images: int = Field(gt=0)  # Fig. 5: rows
    uncond_steps: int = Field(gt=0)  # Fig. 5: DDIM steps (the paper's 1000)
    x0_prompts: int = Field(gt=0)  # Fig. 6: captions, each with an MSE, an MSE+CFG and an SP row
    seed: int = 0


class Margins(Section):
    """The "keeps" and "leaves unchanged" claims: a difference this small counts as none, in the
    statistic's own units."""

    recall: float = Field(ge=0)  # a fraction
    alignment: float = Field(ge=0)  # a fraction recognised, or CLIP score points (0-100) with evaluate.clip


class ReportConfig(Section):
    equivalence_margins: Margins


class JobResources(Section):
    """What one job of a stage asks a cluster for (Snakemake's threads and resources)."""

    cpus: int = Field(gt=0)
    mem_mb: int = Field(gt=0)
    runtime_min: int = Field(gt=0)
    gpus: int = Field(0, ge=0)  # per node
    nodes: int = Field(1, gt=0)  # nodes of one job (training only: one process per GPU on each)


class ResourcesConfig(Section):
    """Per stage command; a command not listed asks for ``default``."""

    default: JobResources
    corpus: JobResources | None = None
    filter: JobResources | None = None
    download: JobResources | None = None
    clip: JobResources | None = None
    clip_embed: JobResources | None = None
    aesthetic_train: JobResources | None = None
    aesthetic: JobResources | None = None
    base: JobResources | None = None
    featnet: JobResources | None = None
    encode: JobResources | None = None
    train: JobResources | None = None
    freeze: JobResources | None = None
    sample: JobResources | None = None
    evaluate: JobResources | None = None
    figures: JobResources | None = None
    report: JobResources | None = None

    def of(self, command: str) -> JobResources:
        return getattr(self, command) or self.default


class ScaleConfig(Section):
    """A scale block. Its ``train`` section holds a section per registered objective: validate with
    ``scale_model()``, which knows them."""

    corpus: CorpusConfig
    filter: FilterConfig
    download: DownloadConfig
    base: BaseModelConfig
    encode: EncodeConfig
    clip: ClipConfig
    aesthetic: AestheticConfig
    schedule: ScheduleConfig
    train: TrainConfig
    featnet: FeatNetConfig
    sample: SampleConfig
    evaluate: EvaluateConfig
    figures: FiguresConfig
    report: ReportConfig
    resources: ResourcesConfig
    authors: AuthorsConfig | None = None


@functools.cache
def _scale_model(objective_settings: tuple[tuple[str, type], ...]) -> type[ScaleConfig]:
    train = create_model("TrainConfig", __base__=TrainConfig, **{name: (settings | None, None) for name, settings in objective_settings})
    return create_model("ScaleConfig", __base__=ScaleConfig, train=(train, ...))


def scale_model() -> type[ScaleConfig]:
    """ScaleConfig whose ``train`` has a section for each objective registered now."""
    return _scale_model(tuple((name, objective.settings) for name, objective in objectives.registered().items()))


# What every stage may read besides its PARAMS: how a job is run, never what it computes.
ALWAYS_READABLE = ("resources",)


class UndeclaredParam(AttributeError):
    """A stage read a key of the scale block that its module's ``PARAMS`` do not name."""


class ConfigView:
    """The part of a scale block a stage declared it reads (its module's ``PARAMS``, which are also
    its DVC params): a declared key gives the real value, a key above one gives a view of its
    section, any other key raises UndeclaredParam. So a stage whose output depends on a key it does
    not declare fails in the tests instead of going stale in DVC."""

    def __init__(self, config: BaseModel, keys: tuple[str, ...], stage: str, prefix: str = ""):
        self._config, self._keys, self._stage, self._prefix = config, (*keys, *ALWAYS_READABLE), stage, prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        path = f"{self._prefix}{name}"
        value = getattr(self._config, name)
        if any(path == key or path.startswith(f"{key}.") for key in self._keys):
            return value
        if any(key.startswith(f"{path}.") for key in self._keys):
            return ConfigView(value, self._keys, self._stage, f"{path}.")
        raise UndeclaredParam(
            f"stage {self._stage} reads {path}, which its PARAMS do not name: add it to PARAMS in "
            f"src/selfperceptual/pipeline/stages/{self._stage}.py (they are its DVC params too; then `make generate`)"
        )

    def __repr__(self) -> str:
        return f"ConfigView({self._stage}: {', '.join(self._keys)})"


class ParamsError(ValueError):
    """params.yaml is malformed; the message names each offending key."""


def _describe(error: ValidationError, prefix: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif isinstance(value, str) and item["type"] in ("float_type", "int_type") and _is_number(value):
            lines.append(f"{key}: {value!r} is a string to YAML; write it with a dot and a signed exponent, e.g. 3.0e-5")
        else:
            lines.append(f"{key}: {item['msg']} (got {value!r})")
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; params.yaml refuses them. A merge
    key's mapping (``<<: *paper``) is not a duplicate: the keys written beside it override it."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """A YAML file, duplicate keys refused; an error names the file, line and column."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"{where}: invalid YAML: {problem}") from None


def validate_params(raw: dict, source: str | Path = "params.yaml") -> dict[str, ScaleConfig]:
    """Validates every scale block of a parsed params file (named ``source`` in errors); returns them by name."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping")
    unknown = sorted(set(raw) - {"scale", *SCALES})
    problems = [f"{key}: unknown key (top level holds 'scale' and {', '.join(SCALES)})" for key in unknown]
    if raw.get("scale") not in SCALES:
        problems.append(f"scale: must be one of {', '.join(SCALES)} (got {raw.get('scale')!r})")
    scales = {}
    for name in SCALES:
        if name not in raw:
            problems.append(f"{name}: missing scale block")
            continue
        try:
            scales[name] = scale_model().model_validate(raw[name])
        except ValidationError as error:
            problems.append(_describe(error, name))
    if problems:
        raise ParamsError(f"invalid {source}: " + "\n".join(problems))  # the first problem on the first line
    return scales


def load_params(path: str | Path, scale: str | None = None, overrides: list[str] = ()) -> tuple[str, ScaleConfig]:
    """Reads and validates ``path``; returns the scale in force (``scale`` overrides the file's),
    with ``overrides`` (``dotted.key=value``) applied on top of its block."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    scales = validate_params(raw := read_yaml(path), path)
    chosen = scale or raw["scale"]
    if chosen not in scales:
        raise ParamsError(f"scale: must be one of {', '.join(SCALES)} (got {chosen!r})")
    return chosen, apply_overrides(scales[chosen], overrides, chosen)


def apply_overrides(config: ScaleConfig, overrides: list[str], scale: str = "") -> ScaleConfig:
    """``["train.sp.layer=encoder", ...]`` set on a validated block, then validated again.

    Values are read as YAML (``3.0e-5`` is a float, ``null`` is None). An ablation is one of
    these on the command line of the one training stage, never a copy of the stage.
    """
    settings = {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ParamsError(f"--set {override}: expected KEY=VALUE, e.g. --set train.sp.layer=encoder")
        settings[key] = yaml.safe_load(text)
    return apply_settings(config, settings, scale, texts=dict(override.partition("=")[::2] for override in overrides))


def apply_settings(config: ScaleConfig, settings: dict[str, object], scale: str = "", texts: dict[str, str] | None = None) -> ScaleConfig:
    """``{"train.sp.layer": "encoder", ...}`` set on a validated block, then validated again (a
    training run's settings as data; ``texts``: how a command line wrote them, for its errors)."""
    block = config.model_dump()
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        section = block
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            written = (texts or {}).get(key, value)
            raise ParamsError(f"--set {key}={written}: no such key in the params block (want dotted.key=value)")
        section[leaf] = value
    try:
        return scale_model().model_validate(block)
    except ValidationError as error:
        raise ParamsError("invalid --set: " + _describe(error, scale)) from None


def json_schema() -> dict:
    """JSON Schema of the whole params.yaml (written to workflow/schemas/ for editors and readers)."""
    block = scale_model().model_json_schema(ref_template="#/$defs/{model}")
    definitions = block.pop("$defs", {})
    definitions["ScaleConfig"] = block
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "params.yaml",
        "description": "Generated by `python -m selfperceptual.pipeline.config schema` from src/selfperceptual/pipeline/config.py. Do not edit.",
        "type": "object",
        "additionalProperties": False,
        "required": ["scale", *SCALES],
        "properties": {"scale": {"enum": list(SCALES)}, **{name: {"$ref": "#/$defs/ScaleConfig"} for name in SCALES}},
        "$defs": definitions,
    }


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a scale's block with every merge and default resolved, as the stages read it")
    show.add_argument("scale", nargs="?", help="default: the scale params.yaml names")
    show.add_argument("--params", default="params.yaml")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    schema = commands.add_parser("schema", help="write the JSON Schema of params.yaml (stdout without a path)")
    schema.add_argument("path", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.command == "schema":
        text = json.dumps(json_schema(), indent=2) + "\n"
        args.path.write_text(text) if args.path else print(text, end="")
        return 0
    try:
        scale, config = load_params(args.params, args.scale, args.overrides)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"# {scale}, resolved from {args.params}{''.join(f' --set {o}' for o in args.overrides)}")
    print(yaml.safe_dump({scale: config.model_dump()}, sort_keys=False, width=120), end="")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
