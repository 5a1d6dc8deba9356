"""Outputs that DVC wrote (``dvc pull``, ``dvc checkout``) made to agree with Snakemake's clock.

Snakemake decides what to run by modification times: a stage runs again when one of its inputs is
newer than its output. DVC decides by content: a stage runs again when the hashes of its inputs,
params or outputs differ from dvc.lock's. After ``dvc pull`` into a fresh clone, every output has
the time DVC wrote it, in DVC's order, so Snakemake would see ``filter`` older than ``corpus`` and
run most of the pipeline again although DVC (rightly) finds nothing changed.

``restamp`` settles it the way DVC sees it: when some output is older than one of its inputs, it
asks ``dvc status`` which stages changed, and gives the outputs of the unchanged ones times in the
order of the DAG (the ``.snakemake_timestamp`` Snakemake keeps in a folder output, else the folder
itself). No file's content is touched, and a stage DVC finds changed keeps its time, so Snakemake
still runs it and all that follows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from graphlib import TopologicalSorter
from pathlib import Path

STAMP = ".snakemake_timestamp"  # where Snakemake keeps a folder output's time (snakemake.io)


def _stamp_of(folder: Path) -> Path:
    stamp = folder / STAMP
    return stamp if stamp.is_file() else folder


def _time_of(path: Path) -> float:
    return _stamp_of(path).stat().st_mtime if path.is_dir() else path.stat().st_mtime


def out_of_order(outputs: dict[str, tuple[str, ...]]) -> list[str]:
    """The outputs (name -> its input paths) that exist and are older than one of their inputs."""
    found = []
    for out, inputs in outputs.items():
        path = Path(out)
        if path.exists() and any(Path(dep).exists() and _time_of(Path(dep)) > _time_of(path) for dep in inputs):
            found.append(out)
    return found


def changed_stages(cwd: Path = Path(".")) -> set[str] | None:
    """The stages ``dvc status`` reports (changed, or not recorded); None when DVC cannot tell."""
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    try:
        return set(json.loads(result.stdout or "{}"))
    except json.JSONDecodeError:
        return None


def restamp(stages: dict[str, tuple[str, tuple[str, ...]]], cwd: Path = Path(".")) -> list[str]:
    """``stages``: name -> (its output, its inputs), paths relative to ``cwd``. Returns the outputs
    given new times (none when every output is already newer than its inputs)."""
    outputs = {out: deps for out, deps in stages.values()}
    with contextlib.chdir(cwd):
        if not out_of_order(outputs):
            return []
        changed = changed_stages()
        if changed is None:
            return []
        producer = {out: name for name, (out, _) in stages.items()}
        graph = {name: {producer[dep] for dep in deps if dep in producer} for name, (_, deps) in stages.items()}
        order = [name for name in TopologicalSorter(graph).static_order() if name not in changed and Path(stages[name][0]).exists()]
        start = time.time()  # after every input outside the DAG (up to a second ahead for a paper-scale DAG)
        for i, name in enumerate(order):
            moment = start + i * 0.01
            os.utime(_stamp_of(Path(stages[name][0])), (moment, moment))
        return [stages[name][0] for name in order]
