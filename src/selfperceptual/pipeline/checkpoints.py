"""Training checkpoints: everything a run needs to continue bit for bit, in safetensors and JSON.

A checkpoint is a folder ``step-NNNNNNNN/`` holding the online model, the EMA, the optimizer's
state tensors (``*.safetensors``) and ``state.json`` (the step, the optimizer's hyperparameters,
the loss history). It is written to a temporary folder and renamed into place, so a folder with
that name is always complete. The store lives outside the stage's output folder (the DAG passes
``runs/<scale>/checkpoints/<stage>``), where neither Snakemake nor DVC deletes it when the job
fails, and under a subfolder per training configuration, so a changed setting starts afresh and
never resumes from (or deletes) another configuration's checkpoints.

Under a configuration's folder, each execution of the stage has its own ``run-<k>``: an execution
that was stopped (a time limit, a kill, a failed report) is resumed by the next, with its MLflow
run; one that finished (``finished.json``) is not, and the next execution trains anew in a folder,
and a run, of its own. When an execution finishes, the folders of those finished before it go:
its outputs have replaced theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..method import objectives
from .io import atomic_dir, read_json, remove_stale_partials, write_json

log = logging.getLogger("checkpoints")
PREFIX = "step-"


# The code that decides what a training step computes: a checkpoint resumes only under the same.
# The whole method package, the loop and what it reads, and the trained objective's own module.
PIPELINE_TRAINING_CODE = ("training.py", "distributed.py", "data/latents.py", "checkpoints.py")


def code_version(objective: str = "mse") -> str:
    pipeline = Path(__file__).parent
    method = pipeline.parent / "method"
    files = [*sorted(method.rglob("*.py")), *(pipeline / name for name in PIPELINE_TRAINING_CODE), *objectives.get(objective).source_files()]
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(settings: dict) -> str:
    """A short, stable name for a training configuration under this training code (what a
    checkpoint may resume)."""
    text = json.dumps({**settings, "code": code_version(settings.get("objective", "mse"))}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict split into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _match_layout(optimizer: torch.optim.Optimizer) -> None:
    """Gives the loaded optimizer state its parameters' memory layout (channels-last ones too:
    checkpoints store contiguous tensors); the values are unchanged."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


FINISHED = "finished.json"


class BrokenCheckpoint(Exception):
    """A checkpoint folder whose files cannot be read (truncated, empty, missing)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is broken: {reason}")
        self.path, self.reason = path, reason


class CheckpointStore:
    def __init__(self, folder: str | Path, keep: int):
        self.folder, self.keep = Path(folder), keep

    @classmethod
    def for_execution(cls, configuration: str | Path, keep: int) -> CheckpointStore:
        """This execution's store under a configuration's folder: the first ``run-<k>`` not finished
        (every process of a launch finds the same one: nothing finishes while they start)."""
        k = 1
        while (Path(configuration) / f"run-{k}" / FINISHED).is_file():
            k += 1
        return cls(Path(configuration) / f"run-{k}", keep)

    def finish(self, record: dict) -> None:
        """Marks this execution finished (its outputs in place and reported): the next one trains
        anew. The checkpoints of the executions that finished before it go."""
        write_json(self.folder / FINISHED, record)
        for earlier in self.folder.parent.glob("run-*"):
            if earlier != self.folder and (earlier / FINISHED).is_file():
                shutil.rmtree(earlier, ignore_errors=True)

    def all(self) -> list[Path]:
        remove_stale_partials(self.folder / PREFIX, pattern=f"{PREFIX}*")  # checkpoints a kill cut short
        return sorted(path for path in self.folder.glob(f"{PREFIX}*") if path.is_dir())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
        optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer)
        final = self.folder / f"{PREFIX}{step:08d}"
        with atomic_dir(final) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
            save_file(optimizer_tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "state.json", {"step": step, "optimizer": optimizer_rest, **meta})
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: step %d in %s", step, final)
        return final

    @staticmethod
    def load(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
        """Restores model, EMA (when given) and optimizer in place; returns ``state.json``. Every
        file is read before anything is restored: a broken checkpoint raises BrokenCheckpoint and
        leaves the model, EMA and optimizer as they were."""
        try:
            state = read_json(path / "state.json")
            step, rest, _, _ = state["step"], state["optimizer"], state["history"], state["train_seconds"]
            weights = load_file(path / "model.safetensors")
            averaged = load_file(path / "ema.safetensors") if ema is not None else None
            moments = load_file(path / "optimizer.safetensors")
        except Exception as error:  # noqa: BLE001 - a truncated, empty or missing file, whichever way it fails
            raise BrokenCheckpoint(path, " ".join(f"{type(error).__name__}: {error}".split())[:200]) from None
        if not isinstance(step, int) or set(weights) != set(model.state_dict()):
            raise BrokenCheckpoint(path, "its state.json or model.safetensors does not describe this model")
        model.load_state_dict(weights, strict=True)
        if ema is not None:
            ema.load_state_dict(averaged, strict=True)
        optimizer.load_state_dict(_optimizer_state(moments, rest))
        _match_layout(optimizer)
        return state

    def resume(self, model: torch.nn.Module, ema: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
               main: bool = True) -> tuple[Path | None, dict | None]:  # fmt: skip
        """Restores the newest checkpoint that loads; returns (its folder, its state.json), or
        (None, None) to start afresh. Each broken one is reported with its path and, by the main
        process, renamed ``broken-step-...`` (kept to look at, never tried or counted again)."""
        broken = []
        for path in reversed(self.all()):
            try:
                return path, self.load(path, model, ema, optimizer)
            except BrokenCheckpoint as error:
                log.warning("%s; resuming from the checkpoint before it", error)
                broken.append(path)
                if main:
                    path.rename(path.with_name(f"broken-{path.name}"))
        if broken:
            log.warning("no checkpoint in %s loads: training starts afresh from step 0", self.folder)
        return None, None
