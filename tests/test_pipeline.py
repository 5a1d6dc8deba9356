"""End to end: the rehearsal scale through Snakemake, the smoke scale through DVC, in temporary
copies of the repo."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from smoke_checks import check_outputs_and_runs
from workspace import copy_repository, environment, run, serve

from selfperceptual.config import load_params
from selfperceptual.dag import build_stages
from selfperceptual.experiments import RELEASED_ROWS, SAMPLE_ROWS, TRAIN_RUNS

pytestmark = pytest.mark.slow


def _kill_after_first_checkpoint(copy, stage: str, snakemake: subprocess.Popen, timeout: float = 900) -> str:
    """SIGKILLs the ``stage`` training process once it has written a checkpoint; returns the name
    of the latest checkpoint it left."""
    checkpoints = copy / "runs" / "rehearsal" / "checkpoints" / stage
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and snakemake.poll() is None:
        written = sorted(path.name for path in checkpoints.glob("*/step-*"))
        if written:
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                # the stage itself (`python -m selfperceptual train ... --out runs/rehearsal/<stage>`), not its shell
                if cmdline[:1] and Path(cmdline[0]).name.startswith("python") and cmdline[-2:] == ["--out", f"runs/rehearsal/{stage}"]:
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
                    return max(path.name for path in checkpoints.glob("*/step-*"))  # the latest, once it is dead
        time.sleep(0.1)
    raise AssertionError(f"{stage} never wrote a checkpoint while running")


def test_snakemake_runs_the_rehearsal_scale_resumes_a_killed_training_job_and_records_it_with_dvc(tmp_path):
    # params.yaml's scale set to rehearsal and dvc.yaml generated for it (make generate), so the
    # Snakefile records the run with DVC as it does for the scale params.yaml names.
    copy = copy_repository(tmp_path, scale="rehearsal")
    run([sys.executable, "-m", "selfperceptual.dag", "--write", "dvc.yaml"], copy)
    config = load_params(copy / "params.yaml", "rehearsal")[1]
    with serve(copy / "data" / "rehearsal" / "laion-images") as url:
        run([sys.executable, "-m", "selfperceptual.rehearsal", "data/rehearsal", "--url-base", url], copy)
        with open(tmp_path / "snakemake.log", "w") as log:
            command = [sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=rehearsal"]
            snakemake = subprocess.Popen(command, cwd=copy, env=environment(), stdout=log, stderr=subprocess.STDOUT)
            killed_at = _kill_after_first_checkpoint(copy, "train_mse", snakemake)
            code = snakemake.wait(timeout=1800)
    output = (tmp_path / "snakemake.log").read_text()
    assert code == 0, output[-6000:]
    runs_dir = copy / "runs" / "rehearsal"

    # The killed job was run again and went on from its checkpoint.
    resumed = json.loads((runs_dir / "train_mse" / "metrics.json").read_text())["resumed_from_step"]
    assert resumed == int(killed_at.removeprefix("step-")) > 0
    assert "Trying to restart job" in output

    # Every stage ran; paper-scale code paths did the work.
    for stage in build_stages(config):
        assert json.loads((runs_dir / stage.name / "params.json").read_text())["scale"] == "rehearsal", stage.name
    assert json.loads((runs_dir / "base" / "summary.json").read_text())["pretrained"] == "data/rehearsal/sd21-base"
    stats = [json.loads((runs_dir / f"download_part{i}" / "stats.json").read_text()) for i in range(config.download.num_jobs)]
    assert sum(s["successes"] for s in stats) > 0 and any("404" in kind for s in stats for kind in s["errors"])
    featnet = json.loads((runs_dir / "featnet" / "summary.json").read_text())
    assert featnet["kind"] == "inception" and (runs_dir / "featnet" / "inception-v3.pth").is_file()
    coco = json.loads((copy / config.corpus.coco_captions).read_text())
    first = {a["image_id"] for a in coco["annotations"][: config.corpus.num_eval_captions]}
    assert featnet["reference_images"] == len(first) < config.corpus.num_eval_captions  # each image once
    for row in (*SAMPLE_ROWS, *RELEASED_ROWS):
        metrics = json.loads((runs_dir / f"evaluate_{row}" / "metrics.json").read_text())
        assert metrics["fid"] > 0 and metrics["is"] >= 1 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1

    # The report puts the authors' checkpoints beside the paper and our runs.
    report = (runs_dir / "report" / "report.md").read_text()
    table1 = report[report.index("## Table 1") : report.index("## Table 2")]
    assert "FID (authors' checkpoint)" in table1
    authors_fid = json.loads((runs_dir / "evaluate_authors_sp_s25" / "metrics.json").read_text())["fid"]
    assert f"{authors_fid:.2f}" in table1

    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["self-perceptual-rehearsal"])
    finished = runs[runs["status"] == "FINISHED"]
    assert set(finished[finished["tags.kind"] == "train"]["tags.stage"]) == set(TRAIN_RUNS)
    evaluations = finished[finished["tags.kind"] == "evaluate"]
    assert set(evaluations["tags.row"]) == set(SAMPLE_ROWS) | set(RELEASED_ROWS)
    assert evaluations["metrics.precision"].notna().all()

    # Snakemake recorded the run with DVC, and has nothing left to do.
    status = run([sys.executable, "-m", "dvc", "status", "--json"], copy)
    assert json.loads(status.stdout) == {}, status.stdout
    again = run([sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=rehearsal"], copy)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dvc_exp_run_runs_the_smoke_scale(tmp_path):
    copy = copy_repository(tmp_path)
    assert yaml.safe_load((copy / "params.yaml").read_text())["scale"] == "local"
    run([sys.executable, "-m", "dvc", "exp", "run", "-S", "scale=smoke"], copy, timeout=2400)  # shares the CPUs with the rehearsal run
    check_outputs_and_runs(copy)
    assert not (copy / "runs" / "local").exists()
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {stage.name for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    assert lock["stages"]["report"]["outs"][0]["path"] == "runs/smoke/report"
