"""End to end, in temporary copies of the repo: the whole rehearsal DAG through Snakemake, and
each kind of smoke-scale stage through DVC."""

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from run_checks import check_outputs_and_runs, execution_runs, finished_runs
from workspace import commit, copy_repository, environment, run, serve

from selfperceptual.pipeline.config import load_params
from selfperceptual.pipeline.dag import build_stages
from selfperceptual.pipeline.experiments import RELEASED_ROWS, SAMPLE_ROWS

pytestmark = pytest.mark.slow


def _kill_after_first_checkpoint(copy, stage: str, snakemake: subprocess.Popen, timeout: float = 900) -> str:
    """SIGKILLs the ``stage`` training process once it has written a checkpoint; returns the name
    of the latest checkpoint it left."""
    checkpoints = copy / "runs" / "rehearsal" / "checkpoints" / stage
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and snakemake.poll() is None:
        written = sorted(path.name for path in checkpoints.glob("*/run-*/step-*"))
        if written:
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                # the stage itself (`python -m selfperceptual train ... --out runs/rehearsal/<stage>`), not its shell
                out = cmdline[cmdline.index("--out") + 1 : cmdline.index("--out") + 2] if "--out" in cmdline else []
                if cmdline[:1] and Path(cmdline[0]).name.startswith("python") and out == [f"runs/rehearsal/{stage}"]:
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
                    return max(path.name for path in checkpoints.glob("*/run-*/step-*"))  # the latest, once it is dead
        time.sleep(0.1)
    raise AssertionError(f"{stage} never wrote a checkpoint while running")


def test_snakemake_runs_the_rehearsal_scale_resumes_a_killed_training_job_and_records_it_with_dvc(tmp_path):
    # params.yaml's scale set to rehearsal and dvc.yaml generated for it (make generate), so the
    # Snakefile records the run with DVC as it does for the scale params.yaml names.
    copy = copy_repository(tmp_path, scale="rehearsal")
    run([sys.executable, "-m", "selfperceptual.pipeline.dag", "--write", "dvc.yaml"], copy)
    config = load_params(copy / "params.yaml", "rehearsal")[1]
    with serve(copy / "data" / "rehearsal" / "laion-images") as url:
        run([sys.executable, "-m", "selfperceptual.pipeline.rehearsal", "data/rehearsal", "--url-base", url], copy)
        with open(tmp_path / "snakemake.log", "w") as log:
            command = [sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=rehearsal"]
            snakemake = subprocess.Popen(command, cwd=copy, env=environment(), stdout=log, stderr=subprocess.STDOUT)
            killed_at = _kill_after_first_checkpoint(copy, "train_mse", snakemake)
            code = snakemake.wait(timeout=5000)  # 11 min beside the other tests on 2 cores (36 before the stage server)
    output = (tmp_path / "snakemake.log").read_text()
    assert code == 0, output[-6000:]
    runs_dir = copy / "runs" / "rehearsal"

    # The killed job was run again and went on from its checkpoint.
    resumed = json.loads((runs_dir / "train_mse" / "metrics.json").read_text())["resumed_from_step"]
    assert resumed == int(killed_at.removeprefix("step-")) > 0
    assert "Trying to restart job" in output
    # Every stage but training was forked from the stage server (src/selfperceptual/pipeline/warm.py).
    assert "stage server ready" in output and "in a new process" not in output

    # Every stage ran, the report and the MLflow runs are complete; paper-scale code paths did the work.
    check_outputs_and_runs(copy, "rehearsal")
    assert json.loads((runs_dir / "base" / "summary.json").read_text())["pretrained"] == "data/rehearsal/sd21-base"
    stats = [json.loads((runs_dir / f"download_part{i}" / "stats.json").read_text()) for i in range(config.download.num_jobs)]
    assert sum(s["successes"] for s in stats) > 0 and any("404" in kind for s in stats for kind in s["errors"])
    featnet = json.loads((runs_dir / "featnet" / "summary.json").read_text())
    assert featnet["kind"] == "inception" and (runs_dir / "featnet" / "inception-v3.safetensors").is_file()  # converted: no pickle read again
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

    # Snakemake recorded the run with DVC, and has nothing left to do.
    status = run([sys.executable, "-m", "dvc", "status", "--json"], copy)
    assert json.loads(status.stdout) == {}, status.stdout
    again = run([sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=rehearsal"], copy)
    assert "Nothing to be done" in again.stdout + again.stderr

    # Each job's console is in its log: of the killed training, the attempt Snakemake ran again (it
    # removes a failed job's log), which resumed.
    log = (runs_dir / "logs" / "train_mse.log").read_text()
    assert log.startswith("=== ") and "train --data" in log.splitlines()[0] and "resuming from" in log, log[-3000:]
    # Snakemake's own report holds the results as report items: the report, its tables, the figures, samples, previews.
    run([sys.executable, "-m", "snakemake", "--report", "snakemake-report.zip", "--config", "scale=rehearsal"], copy)
    with zipfile.ZipFile(copy / "snakemake-report.zip") as archive:  # items: <report>/data/raw/<id>/<file in the stage's folder>
        items = [name.split("/data/raw/", 1)[1].split("/", 1)[1] for name in archive.namelist() if "/data/raw/" in name]
    assert {"report.html", "fig3_4.png", "layout.png", "loss_curves.png"} <= set(items) and "tables/02_table_1_quantitative_evaluation.csv" in items
    stages = build_stages(config)
    assert items.count("samples.png") == sum(stage.command == "evaluate" for stage in stages)
    assert items.count("preview.png") == items.count("loss_curve.json") == sum(stage.command == "train" for stage in stages)


# Each kind of stage but the figures and the report, with the data stages (clip-retrieval, the tiny
# CLIP and predictor). Every stage of the DAG is in dvc.yaml as Snakemake runs it (test_dag.py), and
# the rehearsal run above, figures and report included, ends with a clean `dvc status` over all of
# them; the figures here would add the unconditional models' three stages and a minute of CPU to
# `make test` for no other code path.
DVC_TARGETS = ("evaluate_sp_s25", "aesthetic")
NOT_RUN_BY_DVC = {"figures", "report"}


def test_dvc_exp_run_runs_each_kind_of_smoke_stage(tmp_path):
    copy = copy_repository(tmp_path)
    assert yaml.safe_load((copy / "params.yaml").read_text())["scale"] == "local"
    # Through the stage server's wrapper (DVC starts none of its own): every stage but training forked from it.
    served = [sys.executable, "-m", "selfperceptual.pipeline.warm", "--run"]
    output = run([*served, sys.executable, "-m", "dvc", "exp", "run", "-S", "scale=smoke", *DVC_TARGETS], copy, timeout=3600)  # shares the CPUs with the rehearsal run
    assert "stage server ready" in output.stderr and "in a new process" not in output.stdout + output.stderr
    runs = finished_runs(copy, "smoke")  # training (a new process) and the served stages: one execution
    assert {"train", "evaluate"} <= set(runs["tags.kind"]) and len(set(runs["tags.pipeline_execution"])) == 1
    assert runs["tags.pipeline_execution"].iloc[0].startswith("dvc-")
    (parent,) = execution_runs(copy, "smoke")["run_id"]  # made by its first stage, closed by its stages
    assert set(runs["tags.mlflow.parentRunId"]) == {parent}
    assert not (copy / "runs" / "local").exists()
    stages = {stage.name: stage for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    lock = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]  # the checkout's lock records the local scale
    ran = {name for name, entry in lock.items() if entry["outs"][0]["path"] == f"runs/smoke/{name}"}
    assert {stages[name].command for name in ran} == {stage.command for stage in stages.values()} - NOT_RUN_BY_DVC
    assert set(DVC_TARGETS) <= ran and not NOT_RUN_BY_DVC & ran
    for name in ran:
        assert json.loads((copy / "runs" / "smoke" / name / "params.json").read_text())["scale"] == "smoke", name
    metrics = json.loads((copy / "runs" / "smoke" / "evaluate_sp_s25" / "metrics.json").read_text())
    assert metrics["fid_low"] <= metrics["fid"] <= metrics["fid_high"]
    # DVC knows the results (dvc.yaml's metrics and plots): the evaluation's numbers, the loss curves it trained.
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], copy).stdout)
    (files,) = [revision["data"] for revision in shown.values()]
    assert files["runs/smoke/evaluate_sp_s25/metrics.json"]["data"]["fid"] == metrics["fid"]
    plots = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], copy).stdout)["data"]
    curves = {value["filename"] for value in plots["Training loss"][0]["content"]["data"]["values"]}
    assert {name for name in curves if "train_mse/" in name or "train_sp/" in name} and len(curves) == 2, curves
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps", *DVC_TARGETS], copy).stdout)
    assert status == {}, status


def test_dvc_push_then_pull_into_a_fresh_clone_leaves_nothing_to_do(tmp_path):
    """The smoke scale run with Snakemake and recorded with DVC, pushed to the default remote (a
    folder beside the working copy), pulled into a fresh clone: the clone has every result, and
    neither DVC nor Snakemake finds anything to do; a change DVC sees is still run again."""
    origin = copy_repository(tmp_path / "origin", scale="smoke")
    run([sys.executable, "-m", "selfperceptual.pipeline.dag", "--write", "dvc.yaml"], origin)
    run([sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=smoke"], origin, timeout=3600)  # beside the other tests
    assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], origin).stdout) == {}
    run([sys.executable, "-m", "dvc", "push"], origin)
    store = tmp_path / "selfperceptual-dvc-store"  # .dvc/config's remote: ../../selfperceptual-dvc-store from .dvc
    assert (store / "files" / "md5").is_dir()
    commit(origin, "the smoke scale, run")  # dvc.lock and dvc.yaml, as a user commits them

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "runs").exists()
    run([sys.executable, "-m", "dvc", "pull"], clone)
    for name in ("evaluate_sp_s25/metrics.json", "report/results.json", "train_lpl/pipeline/unet/diffusion_pytorch_model.safetensors"):
        assert (clone / "runs" / "smoke" / name).read_bytes() == (origin / "runs" / "smoke" / name).read_bytes(), name
    assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], clone).stdout) == {}
    repro = run([sys.executable, "-m", "dvc", "repro"], clone)
    assert "Running stage" not in repro.stdout + repro.stderr, repro.stdout[-3000:]
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "all", "--config", "scale=smoke"]
    again = run(snakemake, clone)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]
    assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], clone).stdout) == {}

    # A result changed by hand, which DVC sees and Snakemake's times do not: Snakemake runs its
    # stage and what follows it, not the stages before it.
    with open(clone / "runs" / "smoke" / "filter" / "stats.json", "a") as handle:
        handle.write(" ")
    (clone / "runs" / "smoke" / "corpus" / ".snakemake_timestamp").touch()  # out of order, as after a pull
    planned = run([*snakemake, "--dry-run", "--quiet", "rules"], clone).stdout
    table = planned[planned.index("Job stats:") :].split("\ntotal")[0].splitlines()[3:]  # title, header, rule
    jobs = {line.split()[0] for line in table if line.strip()}
    assert {"filter", "download", "report"} <= jobs and not {"corpus", "featnet"} & jobs, planned
