"""Shared fixtures: tiny SD-shaped components built offline, and the repository's params."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

# A thread per core, shared among the workers (at least one each): `make test` runs three pytest-xdist
# workers, and every process a test starts (a stage, a pipeline's jobs) inherits this. Left alone, each
# process takes a thread per core, and on two cores four busy threads fight (with two workers): the tests outside the three end-to-end
# runs took 580 s of wall time and 1092 s of CPU that way, 468 s and 848 s with one thread each.
# pytest-xdist's controller imports this file too, before it knows the number of workers, and its
# workers inherit its environment: so a value the user set is passed on under its own name, and each
# process decides from that (a controller that set OMP_NUM_THREADS for its own single worker gave
# every worker two threads).
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ.setdefault("SP_TESTS_USER_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ["OMP_NUM_THREADS"] = os.environ["SP_TESTS_USER_THREADS"] or str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
# Jobs that Snakemake gives two threads share the cores with the other worker's tests: OpenMP's
# threads then sleep when idle instead of spinning (the smoke base stage with 2 threads beside a busy
# core: 74 s of CPU spinning, 32 s sleeping, and less wall time). The results are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]

# The end-to-end runs first, longest first: `make test` runs the suite on three pytest-xdist workers
# (-n 3 --dist loadgroup --no-loadscope-reorder), which take two work units each to start with, in
# this order (test_slurm.py is one unit: its tests share one SLURM cluster). Three workers on two
# cores: the end-to-end runs wait on SLURM, on Snakemake's polling and on subprocesses, and a third
# worker fills that time.
FIRST = (
    "test_snakemake_runs_the_rehearsal_scale",  # worker 1, the longest: nothing else long is queued behind it
    "test_smoke_scale_runs_through_the_slurm_profile",  # worker 2, with the rest of test_slurm.py
    "test_dvc_exp_run_runs_each_kind_of_smoke_stage",  # worker 3
    "test_dvc_push_then_pull_into_a_fresh_clone",  # worker 3, after it
    "test_sigterm_then_sigkill_then_resume",  # worker 1, after the rehearsal
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, name in enumerate(FIRST) if item.name.startswith(name)), len(FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _tracking_store(tmp_path_factory):
    """Stages run in this process report to a store of the test session, never the checkout's."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_config():
    from selfperceptual.pipeline.config import load_params

    return load_params(REPO / "params.yaml", "smoke")[1]


@pytest.fixture
def tiny_unet():
    from selfperceptual.method.models import build_unet

    settings = SimpleNamespace(block_out_channels=[16, 32], layers_per_block=1, attention_heads=2, norm_num_groups=8)
    return build_unet(settings, sample_size=8, latent_channels=4, cross_attention_dim=32, seed=0)


@pytest.fixture
def context():
    return torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def latents():
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))


def run_stage(stage: str, out, *arguments, scale: str = "smoke", params=REPO / "params.yaml") -> None:
    """Runs one real stage entry point in this process (what Snakemake and DVC run as a command)."""
    from selfperceptual.pipeline.cli import main

    code = main([stage, "--params", str(params), "--scale", scale, "--out", str(out), *map(str, arguments)])
    assert code == 0, f"{stage} exited with {code}"


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder ``make(folder)`` fills, made once for the whole session, by whichever pytest-xdist
    worker asks first (the others wait for it and share it; the tests that use one never write in
    it). Each worker's base temp dir lies in the session's, which is where the folder goes."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed halfway
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def smoke_stages(tmp_path_factory):
    """The smoke scale's stages up to the cached latents, run once for the tests that need them."""
    return made_once(tmp_path_factory, "smoke_runs", _smoke_stages)


@pytest.fixture(scope="session")
def rehearsal_inputs(tmp_path_factory):
    """A small set of the rehearsal scale's inputs (LAION and COCO files, SD 2.1's layout, Inception)."""
    from selfperceptual.pipeline.rehearsal import write_inputs

    def make(folder):
        write_inputs(folder / "data", "http://127.0.0.1:9", num_laion_rows=60, num_coco_images=8)

    return made_once(tmp_path_factory, "rehearsal_inputs", make) / "data"


def _smoke_stages(runs: Path) -> None:
    run_stage("corpus", runs / "corpus")
    run_stage("filter", runs / "filter", "--corpus", runs / "corpus")
    run_stage("download", runs / "download", "--filtered", runs / "filter", "--corpus", runs / "corpus")
    run_stage("base", runs / "base", "--images", runs / "download")
    run_stage("encode", runs / "encode", "--images", runs / "download", "--base", runs / "base")
