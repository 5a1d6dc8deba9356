"""The smoke scale through the SLURM profile, on a real one-node SLURM cluster started on localhost."""

import re
import subprocess
import sys

import pytest
from slurm_cluster import SlurmUnavailable, one_node_cluster
from smoke_checks import check_outputs_and_runs
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
    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
    "--seconds-between-status-checks", "2", "--latency-wait", "5",
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


def test_smoke_scale_runs_through_the_slurm_profile(slurm, tmp_path):
    copy = copy_repository(tmp_path / "repo", scale="smoke")
    (copy / "cluster.yaml").write_text("cluster: {partition: work}\n")  # the user's settings (not the default partition)
    env = {**environment(), "SLURM_CONF": slurm["SLURM_CONF"]}
    command = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm", *LOCAL_SETTINGS]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    stages = {stage.name for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    jobs = _jobs(env)
    assert set(jobs) == stages, f"not run through sbatch: {sorted(stages - set(jobs))}"
    assert {job["JobState"] for job in jobs.values()} == {"COMPLETED"}, {rule: job["JobState"] for rule, job in jobs.items()}
    assert {job["Partition"] for job in jobs.values()} == {"work"}
    assert jobs["base"]["NumCPUs"] == "2" and jobs["filter"]["NumCPUs"] == "1"  # params.yaml's resources
    for rule, job in jobs.items():  # the profile keeps every job's log
        assert (copy / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job['JobId']}.log").is_file(), rule
    check_outputs_and_runs(copy)
