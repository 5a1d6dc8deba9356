"""The pipeline's DAG, written once: Snakemake's rules and DVC's ``dvc.yaml`` are both made from it.

Every stage is ``python -m selfperceptual <command> ...`` with every path on its command line,
one output folder under ``runs/<scale>/``, and the params.yaml keys it reads. ``{scale}`` in a
stage stands for the scale in force: DVC writes it as ``${scale}`` (interpolated from
params.yaml), Snakemake fills it from its config.

    python -m selfperceptual.dag --write dvc.yaml   # regenerate after changing this file
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .experiments import FREEZES, SAMPLE_ROWS, TRAIN_RUNS

PARAMS_FILE = "params.yaml"
PAPER_RESULTS = "workflow/paper_results.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    args: str  # the command after ``python -m selfperceptual``
    deps: tuple[str, ...]
    params: tuple[str, ...]  # keys inside the scale block
    threads: int = 1  # what Snakemake gives the job (stages that mostly run alone take both cores)

    @property
    def out(self) -> str:
        return run_dir(self.name)

    @property
    def cmd(self) -> str:
        return f"python -m selfperceptual {self.args} --params {PARAMS_FILE} --scale {{scale}} --out {self.out}"


def run_dir(stage: str) -> str:
    return f"runs/{{scale}}/{stage}"


def _stage(name: str, command: str, inputs: dict[str, str], params: tuple[str, ...], extra: str = "", threads: int = 1) -> Stage:
    """A stage whose inputs are other stages' folders, passed as ``--<flag> <folder>``."""
    flags = " ".join(f"--{flag} {run_dir(source)}" for flag, source in inputs.items())
    args = " ".join(part for part in (command, flags, extra) if part)
    return Stage(name, args, tuple(run_dir(source) for source in inputs.values()), params, threads)


def build_stages() -> list[Stage]:
    stages = [
        _stage("corpus", "corpus", {}, ("corpus", "download.resolution")),
        _stage("filter", "filter", {"corpus": "corpus"}, ("filter",)),
        _stage("download", "download", {"filtered": "filter", "corpus": "corpus"}, ("download",)),
        _stage("base", "base", {"images": "download"}, ("base", "schedule", "download.resolution"), threads=2),
        _stage("featnet", "featnet", {"corpus": "corpus"}, ("featnet", "evaluate", "corpus.seed", "download.resolution")),
        _stage("encode", "encode", {"images": "download", "base": "base"}, ("encode",), threads=2),
    ]
    for run in TRAIN_RUNS.values():
        inputs = {"data": "encode", "init": run.init}
        if run.perceptual:
            inputs["perceptual"] = run.perceptual
        params = ("train.seed", "train.global_batch", "train.ema_decay", "train.log_every_steps", f"train.{run.objective}", "schedule")
        extra = " ".join([f"--objective {run.objective} --conditioning {run.conditioning}", *(f"--set {s}" for s in run.settings)])
        stages.append(_stage(run.name, "train", inputs, params, extra))
    for name, source in FREEZES.items():
        stages.append(_stage(name, "freeze", {"model": source}, ()))
    for row in SAMPLE_ROWS.values():
        stages.append(_stage(f"sample_{row.name}", "sample", {"model": row.model, "corpus": "corpus"}, ("sample",), f"--row {row.name}"))
        stages.append(
            _stage(f"evaluate_{row.name}", "evaluate", {"samples": f"sample_{row.name}", "featnet": "featnet"}, ("evaluate",))
        )
    evaluations = [run_dir(f"evaluate_{row}") for row in SAMPLE_ROWS]
    samples = [run_dir(f"sample_{row}") for row in SAMPLE_ROWS]
    report_args = " ".join(
        ["report"]
        + [f"--evaluation {path}" for path in evaluations]
        + [f"--samples {path}" for path in samples]
        + [f"--featnet {run_dir('featnet')}", f"--paper-results {PAPER_RESULTS}"]
    )
    stages.append(Stage("report", report_args, (*evaluations, *samples, run_dir("featnet"), PAPER_RESULTS), ("report",)))
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


def missing_external_inputs(config) -> list[str]:
    """External inputs a scale names that are not on this machine (the paper scale's data)."""
    missing = []
    if config.corpus.source == "external":
        for key in ("laion_parquet", "coco_captions", "coco_images"):
            path = getattr(config.corpus, key)
            if not path or not Path(path).exists():
                missing.append(f"corpus.{key}: {path} (LAION-Aesthetics metadata / MSCOCO-2014 val)")
    pretrained = config.base.pretrained
    if pretrained and not Path(pretrained).exists() and not _in_hub_cache(pretrained):
        missing.append(f"base.pretrained: {pretrained} (not a local folder, and not in the Hugging Face cache)")
    return missing


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:
        return False


def dvc_yaml(stages: list[Stage]) -> dict:
    def dvc(text: str) -> str:
        return text.replace("{scale}", "${scale}")

    return {
        "stages": {
            stage.name: {
                "cmd": dvc(stage.cmd),
                **({"deps": [dvc(dep) for dep in stage.deps]} if stage.deps else {}),
                **({"params": [dvc(f"{{scale}}.{key}") for key in stage.params]} if stage.params else {}),
                "outs": [dvc(stage.out)],
            }
            for stage in stages
        }
    }


HEADER = "# Generated by `python -m selfperceptual.dag --write dvc.yaml` from src/selfperceptual/dag.py. Do not edit.\n"


def render_dvc_yaml() -> str:
    return HEADER + yaml.safe_dump(dvc_yaml(build_stages()), sort_keys=False, width=1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="write dvc.yaml here")
    parser.add_argument("--check", type=Path, help="exit 1 if this dvc.yaml differs from the DAG")
    args = parser.parse_args(argv)
    text = render_dvc_yaml()
    if args.write:
        args.write.write_text(text)
    if args.check and args.check.read_text() != text:
        print(f"{args.check} is out of date: run python -m selfperceptual.dag --write {args.check}", file=sys.stderr)
        return 1
    if not (args.write or args.check):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
