"""End to end: the smoke scale through Snakemake and through DVC, in temporary copies of the repo."""

import json
import sys

import pytest
import yaml
from smoke_checks import check_outputs_and_runs
from workspace import copy_repository, run

from selfperceptual.config import load_params
from selfperceptual.dag import build_stages

pytestmark = pytest.mark.slow


def test_snakemake_runs_the_smoke_scale_and_records_it_with_dvc(tmp_path):
    copy = copy_repository(tmp_path, scale="smoke")
    result = run([sys.executable, "-m", "snakemake", "--cores", "all"], copy, timeout=1200)
    assert "Not recorded" not in result.stdout + result.stderr
    check_outputs_and_runs(copy)
    status = run([sys.executable, "-m", "dvc", "status", "--json"], copy)
    assert json.loads(status.stdout) == {}, status.stdout
    again = run([sys.executable, "-m", "snakemake", "--cores", "all"], copy)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dvc_exp_run_runs_the_smoke_scale(tmp_path):
    copy = copy_repository(tmp_path)
    assert yaml.safe_load((copy / "params.yaml").read_text())["scale"] == "local"
    run([sys.executable, "-m", "dvc", "exp", "run", "-S", "scale=smoke"], copy, timeout=1200)
    check_outputs_and_runs(copy)
    assert not (copy / "runs" / "local").exists()
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {stage.name for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    assert lock["stages"]["report"]["outs"][0]["path"] == "runs/smoke/report"
