"""The smoke scale through the SLURM profile, on a real one-node SLURM cluster started on localhost."""

import json
import re
import subprocess
import sys
import time

import pytest
from slurm_cluster import SlurmUnavailable, one_node_cluster
from workspace import copy_repository, environment

from selfperceptual.config import load_params
from selfperceptual.dag import build_stages

pytestmark = pytest.mark.slow


@pytest.fixture
def slurm(tmp_path):
    try:
        with one_node_cluster(tmp_path / "slurm") as env:
            yield env
    except SlurmUnavailable as error:
        pytest.skip(f"SLURM cannot run on this machine: {error}")


# Added to the profile for this cluster, which keeps no accounting: jobs are followed with squeue
# (no sacct), and submitted without an account (the executor finds none to guess). Short status
# intervals keep the test quick; a user's cluster needs none of these.
LOCAL_SETTINGS = [
    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1", "--latency-wait", "5",
]


def _jobs(env) -> dict[str, dict[str, str]]:
    """SLURM's record of every job it ran (this cluster never purges finished jobs), by rule."""
    listing = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in listing.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        rule = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", fields.get("Comment", ""))  # the executor's comment
        if rule:
            jobs[rule.group(1)] = fields
    return jobs


def _job_records(env, rule: str) -> list[dict[str, str]]:
    """Every job SLURM ran for one rule, oldest first."""
    listing = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True).stdout
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in listing.splitlines()]
    return sorted((r for r in records if r.get("Comment", "") == f"rule_{rule}"), key=lambda r: int(r["JobId"]))


def _finish(snakemake, env, timeout: float) -> str:
    """Snakemake's output once it ends. A job SLURM could not launch is held for good, and Snakemake
    would wait on it until the timeout: that fails at once, with slurmd's reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return snakemake.communicate(timeout=5)[0]  # a retry after the timeout loses no output
        except subprocess.TimeoutExpired:
            held = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=env, capture_output=True, text=True, check=False).stdout
            if "launch failed" in held or time.monotonic() > deadline:
                snakemake.kill()
                raise AssertionError(f"SLURM could not launch a job ({held.strip()}) or Snakemake ran past {timeout} s") from None


def _stop_training_with_sigterm(snakemake, copy, env) -> str:
    """Once train_mse has its first checkpoint, does to its job what SLURM does ahead of a time
    limit (``--signal=TERM@600``: SIGTERM to the job's steps); returns the job's id."""
    deadline = time.monotonic() + 900
    while not list((copy / "runs" / "smoke" / "checkpoints" / "train_mse").glob("*/step-*")):
        if snakemake.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"train_mse never checkpointed:\n{snakemake.communicate()[0][-6000:]}")
        time.sleep(0.2)
    (job,) = _job_records(env, "train_mse")
    subprocess.run(["scancel", "--signal=TERM", job["JobId"]], env=env, check=True)
    return job["JobId"]


# Every stage command of the training path, SP training included: the whole DAG runs through Snakemake
# at the rehearsal scale, and each kind of stage through DVC at the smoke scale (test_pipeline.py);
# here each of these kinds of job goes through sbatch once (the data stages after clip run on CPUs
# like download, which does).
TARGET = "evaluate_sp_s25"
TARGET_STAGES = {"corpus", "filter", "download", "clip", "base", "featnet", "encode", "train_mse", "freeze", "train_sp", "sample_sp_s25", TARGET}


def test_smoke_scale_runs_through_the_slurm_profile(slurm, tmp_path):
    """Each kind of smoke-scale job through sbatch, with train_mse's job stopped as at a time
    limit: it checkpoints and exits 143, Snakemake restarts it, and it resumes."""
    copy = copy_repository(tmp_path / "repo", scale="smoke")
    (copy / "cluster.yaml").write_text("cluster: {partition: work}\n")  # the user's settings (not the default partition)
    params = copy / "params.yaml"  # long enough to be stopped halfway
    params.write_text(params.read_text().replace("mse: {num_steps: 20,", "mse: {num_steps: 60,", 1))
    env = {**environment(), "SLURM_CONF": slurm["SLURM_CONF"]}
    command = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm", *LOCAL_SETTINGS, TARGET]
    snakemake = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = _stop_training_with_sigterm(snakemake, copy, env)
    output = _finish(snakemake, env, timeout=1800)
    assert snakemake.returncode == 0, output[-6000:]

    assert TARGET_STAGES <= {stage.name for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    jobs = _jobs(env)
    assert set(jobs) == TARGET_STAGES, f"not run through sbatch: {sorted(TARGET_STAGES - set(jobs))}"
    assert {job["JobState"] for job in jobs.values()} == {"COMPLETED"}, {rule: job["JobState"] for rule, job in jobs.items()}
    assert {job["Partition"] for job in jobs.values()} == {"work"}
    assert jobs["base"]["NumCPUs"] == "2" and jobs["filter"]["NumCPUs"] == "1"  # params.yaml's resources
    for rule, job in jobs.items():  # the profile keeps every job's log
        assert (copy / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job['JobId']}.log").is_file(), rule
    metrics = json.loads((copy / "runs" / "smoke" / TARGET / "metrics.json").read_text())
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1

    # Snakemake restarted the stopped stage (the training rules' retries): inside the same
    # allocation while it has time left, as a new job once SLURM ends it; either way it resumed.
    records = _job_records(env, "train_mse")
    assert records[0]["JobId"] == stopped and records[-1]["JobState"] == "COMPLETED"
    log = "".join((copy / ".snakemake" / "slurm_logs" / "rule_train_mse" / f"{r['JobId']}.log").read_text() for r in records)
    for event in ("SIGTERM: stopping after this step", "training stopped by SIGTERM after step", "Trying to restart job", "resuming from"):
        assert event in log, event
    assert 0 < json.loads((copy / "runs" / "smoke" / "train_mse" / "metrics.json").read_text())["resumed_from_step"] < 60
