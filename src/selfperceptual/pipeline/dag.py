"""The pipeline's DAG, written once: Snakemake's rules and DVC's ``dvc.yaml`` are both made from it.

Every stage is ``python -m selfperceptual <command> ...`` with every path on its command line,
one output folder under ``runs/<scale>/``, and the params.yaml keys it reads. ``{scale}`` in a
stage stands for the scale in force: DVC writes it as ``${scale}`` (interpolated from
params.yaml), Snakemake fills it from its config.

    python -m selfperceptual.pipeline.dag --write dvc.yaml   # regenerate after changing this file
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ..method import objectives
from .stages import declared_params
from .config import ParamsError, load_params
from .experiments import PEERS, RELEASED_MODELS, RELEASED_ROWS, ReleasedModel, SampleRow, TrainRun, plan

PARAMS_FILE = "params.yaml"
PAPER_RESULTS = "workflow/paper_results.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the stage command of ``python -m selfperceptual`` (what params.yaml's resources are keyed by)
    args: str  # what follows the command: input folders and options, rendered from ``spec``
    deps: tuple[str, ...]
    params: tuple[str, ...]  # keys inside the scale block: its spec's, or its command module's PARAMS
    priority: int = 0  # Snakemake starts the highest first among runnable jobs: long jobs early, so no core idles at the end
    spec: TrainRun | SampleRow | ReleasedModel | None = None  # what the stage was made from (what readers of the DAG read)

    @property
    def out(self) -> str:
        return run_dir(self.name)

    @property
    def cmd(self) -> str:
        args = f" {self.args}" if self.args else ""
        return f"python -m selfperceptual {self.command}{args} --params {PARAMS_FILE} --scale {{scale}} --out {self.out}"


# Training, and what training waits for, before sampling; the longest objectives' jobs (Cas-DM's) first of all.
BEFORE_TRAINING, LONG_RUNNING = 1, 2


def run_dir(stage: str) -> str:
    return f"runs/{{scale}}/{stage}"


def checkpoint_dir(stage: str) -> str:
    """A training stage's checkpoints: not an output, so no tool deletes them when a job fails."""
    return f"runs/{{scale}}/checkpoints/{stage}"


def _stage(name: str, command: str, inputs: dict[str, list[str]], extra: str = "", spec=None) -> Stage:
    """A stage whose inputs are other stages' folders, passed as ``--<flag> <folder>`` (repeated).
    Its params: what its spec depends on where the spec says (a training run, a released model),
    else what its command's module reads (``PARAMS``, which the command line holds it to)."""
    flags = [f"--{flag} {run_dir(source)}" for flag, sources in inputs.items() for source in sources]
    deps = tuple(run_dir(source) for sources in inputs.values() for source in sources)
    params = spec.params() if hasattr(spec, "params") else declared_params(command)
    return Stage(name, command, " ".join([*flags, *([extra] if extra else [])]), deps, params, spec=spec)


def _split(name: str, command: str, inputs: dict[str, list[str]], extra: str, num_jobs: int, spec=None) -> list[Stage]:
    """One stage, or ``num_jobs`` stages ``<name>_part<i>`` that each do a contiguous block of it."""
    if num_jobs == 1:
        return [_stage(name, command, inputs, extra, spec)]
    return [_stage(f"{name}_part{i}", command, inputs, " ".join(filter(None, [extra, f"--part {i}/{num_jobs}"])), spec) for i in range(num_jobs)]


def set_flags(overrides: dict[str, object]) -> list[str]:
    """``--set key=value`` for each setting (the one place settings become command text)."""
    return [f"--set {key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]


def _names(stages: list[Stage]) -> list[str]:
    return [stage.name for stage in stages]


def data_checks(config, downloads: list[Stage]) -> list[Stage]:
    """clip-retrieval's embeddings of the downloaded shards and the aesthetic score measured anew;
    where no CLIP or predictor weights exist (``clip.model``, ``aesthetic.weights`` null), the stages
    that train the tiny ones."""
    tiny_clip = config.clip.model is None
    clip = {"clip": ["clip"]} if tiny_clip else {}
    stages = [_stage("clip", "clip", {"images": _names(downloads)})] if tiny_clip else []
    stages.append(_stage("clip_embed", "clip_embed", {"images": _names(downloads), **clip}))
    predictor = {}
    if config.aesthetic.weights is None:
        stages.append(_stage("aesthetic_train", "aesthetic_train", {"corpus": ["corpus"], **clip}))
        predictor = {"predictor": ["aesthetic_train"]}
    stages.append(_stage("aesthetic", "aesthetic", {"embeddings": ["clip_embed"], **predictor}))
    return stages


def build_stages(config) -> list[Stage]:
    """Every stage of one scale (the scale's ``num_jobs`` settings decide how stages are split)."""
    downloads = _split("download", "download", {"filtered": ["filter"], "corpus": ["corpus"]}, "", config.download.num_jobs)
    encodes = _split("encode", "encode", {"images": _names(downloads), "base": ["base"]}, "", config.encode.num_jobs)
    stages = [
        _stage("corpus", "corpus", {}),
        _stage("filter", "filter", {"corpus": ["corpus"]}),
        *downloads,
        # A pretrained base model needs no downloaded images (the tiny one trains its VAE on them).
        _stage("base", "base", {} if config.base.pretrained else {"images": _names(downloads)}),
        _stage("featnet", "featnet", {"corpus": ["corpus"]}),
        *encodes,
        *data_checks(config, downloads),
    ]
    runs = plan(config.train.seeds)
    for run in runs.train_runs.values():
        objective, settings = objectives.get(run.objective), config.train.objective(run.objective)
        sources = {**objective.default_sources(settings), **dict(run.inputs)}  # e.g. SP's f*, Cas-DM's LPIPS network
        missing = [name for name in objective.needs(settings) if name not in sources]
        if missing:
            raise ParamsError(f"{run.name}: objective {run.objective} needs {', '.join(missing)}, which no stage provides")
        inputs = {"data": _names(encodes), "init": [run.init], **{name: [sources[name]] for name in objective.needs(settings)}}
        extra = " ".join([
            f"--objective {run.objective} --conditioning {run.conditioning} --checkpoints {checkpoint_dir(run.name)}",
            *([f"--steps-of {run.steps_of}"] if run.steps_of else []),
            *set_flags(run.overrides(config)),
        ])
        stage = _stage(run.name, "train", inputs, extra, run)
        stages.append(replace(stage, priority=LONG_RUNNING if objective.long_running else BEFORE_TRAINING))
    for name, source in runs.freezes.items():
        stages.append(replace(_stage(name, "freeze", {"model": [source]}), priority=BEFORE_TRAINING))
    rows = list(runs.rows.values())
    if config.authors:  # the authors' checkpoints, imported as base models are
        for model in RELEASED_MODELS.values():
            path = getattr(config.authors, model.objective)
            stages.append(_stage(model.name, "base", {}, " ".join(set_flags({"base.pretrained": path})), model))
        rows += RELEASED_ROWS.values()
    evaluations = []
    for row in rows:
        parts = _split(f"sample_{row.name}", "sample", {"model": [row.model], "corpus": ["corpus"]}, f"--row {row.name}", config.sample.num_jobs, row)
        clip = {"clip": ["clip"]} if config.clip.model is None else {}  # the CLIP score's CLIP
        evaluation = _stage(f"evaluate_{row.name}", "evaluate", {"samples": _names(parts), "featnet": ["featnet"], "corpus": ["corpus"], **clip}, spec=row)
        stages += [*parts, evaluation]
        evaluations.append(evaluation.name)
    figures = {"mse": ["train_mse"], "sp": ["train_sp"], "uncond_mse": ["train_mse_uncond"], "uncond_sp": ["train_sp_uncond"], "corpus": ["corpus"]}
    stages.append(_stage("figures", "figures", figures))
    report = _stage(
        "report", "report",
        {"evaluation": evaluations, "featnet": ["featnet"], "figures": ["figures"], "training": [peer.training for peer in PEERS], "aesthetic": ["aesthetic"],
         "data": ["corpus", "filter", *_names(downloads)]},
        f"--paper-results {PAPER_RESULTS}",
    )  # fmt: skip
    stages.append(replace(report, deps=(*report.deps, PAPER_RESULTS)))
    return stages


def param_values(block: dict, keys: tuple[str, ...]) -> dict:
    """The values of dotted keys in a scale block as params.yaml writes them (what DVC tracks)."""
    values = {}
    for key in keys:
        value = block
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values


# Where each external input of the paper scale comes from (docs/scales.md: the paper scale).
SOURCES = {
    "corpus.laion_parquet": "LAION-Aesthetics V2 6+ metadata: the parquet files of the Hugging Face dataset "
    "ChristophSchuhmann/improved_aesthetics_6plus, concatenated",
    "corpus.coco_captions": "annotations/captions_val2014.json of http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
    "corpus.coco_images": "the val2014/ folder of http://images.cocodataset.org/zips/val2014.zip",
    "base.pretrained": "hf download stabilityai/stable-diffusion-2-1-base (or a local copy of its folder)",
    "authors.mse": "hf download ByteDance/sd2.1-base-zsnr-laionaes6",
    "authors.sp": "hf download ByteDance/sd2.1-base-zsnr-laionaes6-perceptual",
    "evaluate.clip": "hf download openai/clip-vit-large-patch14 (or a local copy of its folder)",
    "clip.model": "hf download openai/clip-vit-large-patch14 (or a local copy of its folder)",
    "aesthetic.weights": "the LAION improved-aesthetic-predictor's weights, "
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
}


def objective_files() -> dict[str, str]:
    """The files objectives' settings name (``train.<objective>.<key>``), and where to get each."""
    return {f"train.{name}.{key}": source for name, objective in objectives.registered().items() for key, source in objective.files.items()}


def external_inputs() -> tuple[str, ...]:
    """Every key missing_external_inputs can name: those of SOURCES, the objectives' files, and
    torch-fidelity's Inception weights, whose address torch-fidelity owns (_source)."""
    return (*SOURCES, *objective_files(), "featnet.inception_weights")


def missing_external_inputs(config) -> list[str]:
    """Each external input a scale names that is not on this machine, with where to get it."""
    paths, models = {}, {}
    if config.corpus.source == "external":
        paths.update({f"corpus.{key}": getattr(config.corpus, key) for key in ("laion_parquet", "coco_captions", "coco_images")})
    if config.featnet.kind == "inception":
        paths["featnet.inception_weights"] = config.featnet.inception_weights
    for name, objective in objectives.registered().items():  # the objectives a scale trains have settings
        if getattr(config.train, name, None) is not None:
            paths.update({f"train.{name}.{key}": path for key, path in objective.files_in_use(config.train.objective(name)).items()})
    if config.aesthetic.weights is not None:
        paths["aesthetic.weights"] = config.aesthetic.weights
    if config.base.pretrained:
        models["base.pretrained"] = config.base.pretrained
    if config.authors:
        models.update({"authors.mse": config.authors.mse, "authors.sp": config.authors.sp})
    if config.evaluate.clip:
        models["evaluate.clip"] = config.evaluate.clip
    if config.clip.model:
        models["clip.model"] = config.clip.model
    missing = [key for key, path in paths.items() if not path or not Path(path).exists()]
    missing += [key for key, name in models.items() if not Path(name).exists() and not _in_hub_cache(name)]
    values = {**paths, **models}
    return [f"{key}: {values[key]} is not there. Get it from {_source(key)}" for key in missing]


def _source(key: str) -> str:
    if key == "featnet.inception_weights":  # torch-fidelity owns the address (imported only when needed)
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return f"{URL_INCEPTION_V3} (torch-fidelity's Inception-v3 weights)"
    return SOURCES.get(key) or objective_files()[key]


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False


def dvc_yaml(stages: list[Stage]) -> dict:
    def dvc(text: str) -> str:
        return text.replace("{scale}", "${scale}")

    of = lambda command: [stage for stage in stages if stage.command == command]  # noqa: E731
    return {
        "stages": {
            stage.name: {
                "cmd": dvc(stage.cmd),
                **({"deps": [dvc(dep) for dep in stage.deps]} if stage.deps else {}),
                **({"params": [dvc(f"{{scale}}.{key}") for key in stage.params]} if stage.params else {}),
                "outs": [dvc(stage.out)],
            }
            for stage in stages
        },
        # What `dvc metrics show`, `dvc exp show` and `dvc plots show` read (files inside the stages' outputs).
        "metrics": [dvc(f"{stage.out}/metrics.json") for stage in of("evaluate")],
        "plots": [
            {"Training loss": {"template": "linear", "x": "step", "y": {dvc(f"{stage.out}/loss.csv"): "loss" for stage in of("train")}}},
            {"FID per sampling row, with its 95% bootstrap interval": {
                "template": "bar_horizontal", "x": "fid", "y": {dvc(f"{stage.out}/fid_by_row.csv"): "row" for stage in of("report")}}},
        ],  # fmt: skip
    }


def render_dvc_yaml(params_file: str | Path = PARAMS_FILE) -> str:
    """dvc.yaml for the scale params.yaml names (its ``num_jobs`` settings decide the stage split;
    other scales with the same settings run from the same file, ``dvc exp run -S scale=...``)."""
    _, config = load_params(params_file)
    header = (  # names no scale: every scale whose settings give the same stages matches the file
        "# Generated by `make generate` (python -m selfperceptual.pipeline.dag --write dvc.yaml) from src/selfperceptual/pipeline/dag.py\n"
        "# and the train.seeds and num_jobs settings of params.yaml's scale. Do not edit.\n"
    )
    return header + yaml.safe_dump(dvc_yaml(build_stages(config)), sort_keys=False, width=1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="write dvc.yaml here")
    parser.add_argument("--check", type=Path, help="exit 1 if this dvc.yaml differs from the DAG")
    args = parser.parse_args(argv)
    text = render_dvc_yaml()
    if args.write:
        args.write.write_text(text)
    if args.check and args.check.read_text() != text:
        print(f"{args.check} is out of date: run python -m selfperceptual.pipeline.dag --write {args.check}", file=sys.stderr)
        return 1
    if not (args.write or args.check):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
