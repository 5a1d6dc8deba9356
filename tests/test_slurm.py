"""The SLURM profile on a real SLURM cluster started on localhost, shaped like a GPU cluster (two
nodes of 8 GPUs, 64 CPUs and about 1 TB each; tests/slurm_cluster.py): every paper-scale request
judged by SLURM, and the smoke scale run through sbatch."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import NODES, PARTITION_MAX_TIME, SlurmUnavailable, gpu_cluster
from workspace import REPO, copy_repository, environment

from selfperceptual.pipeline.cluster import cluster_settings, rule_resources
from selfperceptual.pipeline.config import load_params
from selfperceptual.pipeline.dag import build_stages

# One cluster for the module (SLURM's default configuration path can name one cluster at a time on a
# machine), so its tests run on one pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        with gpu_cluster(tmp_path_factory.mktemp("slurm")) as env:
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


def _jobs(env, since: int = 0) -> dict[str, dict[str, str]]:
    """SLURM's record of every job it ran (this cluster never purges finished jobs) after job ``since``, by rule."""
    listing = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in listing.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        rule = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", fields.get("Comment", ""))  # the executor's comment
        if rule and int(fields["JobId"]) > since:
            jobs[rule.group(1)] = fields
    return jobs


def _last_job_id(env) -> int:
    listing = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], env=env, capture_output=True, text=True, check=True).stdout
    return max(map(int, listing.split()), default=0)


# A Snakefile whose rules ask for exactly what the pipeline's paper-scale rules ask for (the same
# params.yaml resources through the same rule_resources), each with a probe in place of its stage.
PROBE_SNAKEFILE = """
from selfperceptual.pipeline.cluster import rule_resources
from selfperceptual.pipeline.config import load_params

_, CONFIG = load_params({params!r}, "paper")
CLUSTER = {cluster!r}
JOBS = {jobs!r}  # rule name -> (stage command, nodes)
for name, (command, nodes) in JOBS.items():
    job = CONFIG.resources.of(command).model_copy(update={{"nodes": nodes}})

    rule:
        name:
            name
        output:
            f"probes/{{name}}.json"
        threads: job.cpus
        resources:
            **rule_resources(job, CLUSTER, command),
        params:
            kind=command,
        shell:
            "python {probe} {{output}} {{params.kind}}"
"""


def test_slurm_accepts_and_places_every_paper_scale_job(slurm, tmp_path):
    """Every kind of paper-scale job, submitted by the SLURM profile with exactly the pipeline's
    request, is accepted and placed as intended: its GPUs on each node, its CPUs, its memory, a time
    limit within the partition's; a two-node training job's launcher reaches both nodes and starts
    torchrun for each node's 8 GPUs. The cluster.yaml is a user's: a CPU and a GPU partition, and the
    GPU partition's 48-hour limit as max_runtime (training needs 321 h: a chain of jobs)."""
    config = load_params(REPO / "params.yaml", "paper")[1]
    commands = sorted({stage.command for stage in build_stages(config)})
    jobs = {**{command: (command, 1) for command in commands}, "train_2nodes": ("train", 2)}
    cluster = cluster_settings({"partition": "work", "gpu_partition": "gpu", "max_runtime": PARTITION_MAX_TIME})
    (tmp_path / "Snakefile").write_text(PROBE_SNAKEFILE.format(params=str(REPO / "params.yaml"), cluster=cluster, jobs=jobs,
                                                               probe=REPO / "tests" / "slurm_probe.py"))
    since = _last_job_id(slurm)
    command = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "workflow" / "profiles" / "slurm"), *LOCAL_SETTINGS,
               *(f"probes/{name}.json" for name in jobs)]
    snakemake = subprocess.Popen(command, cwd=tmp_path, env={**environment(), "SLURM_CONF": slurm["SLURM_CONF"]},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _finish(snakemake, slurm, timeout=600)
    assert snakemake.returncode == 0, output[-6000:]

    records = _jobs(slurm, since)
    assert set(records) == set(jobs)
    for name, (command, nodes) in jobs.items():
        job, record = config.resources.of(command), records[name]
        probe = json.loads((tmp_path / "probes" / f"{name}.json").read_text())
        assert record["JobState"] == "COMPLETED", (name, record["JobState"])
        assert record["Partition"] == ("gpu" if job.gpus else "work"), name
        assert int(record["NumNodes"]) == nodes and int(record["NumCPUs"]) == job.cpus * nodes, (name, record["NumNodes"], record["NumCPUs"])
        assert _megabytes(record["MinMemoryNode"]) == job.mem_mb, (name, record["MinMemoryNode"])
        assert record["TimeLimit"] == _slurm_time(rule_resources(job, cluster, command)["runtime"]), name
        assert record.get("TresPerNode", "") == (f"gres:gpu:{job.gpus}" if job.gpus else ""), name
        assert probe["gpus"] == job.gpus, (name, probe["env"].get("CUDA_VISIBLE_DEVICES"))  # what the stage sees in its step
        assert "SLURM_STEP_ID" in probe["env"], name  # a job step, whose every process SLURM signals (distributed.run_launch)
        # The executor's step inside the job asks for the job's threads, which Snakemake caps at the cores
        # the node really has: all of them on a real node, this machine's few here.
        assert probe["env"]["SLURM_CPUS_PER_TASK"] == str(min(job.cpus, len(os.sched_getaffinity(0)))), name
    assert records["train"]["TimeLimit"] == "2-00:00:00"  # the partition's limit, not the 321 h the stage needs

    one_node = json.loads((tmp_path / "probes" / "train.json").read_text())["launch"]
    assert "--standalone" in one_node and "--nproc-per-node=8" in one_node
    two = json.loads((tmp_path / "probes" / "train_2nodes.json").read_text())
    assert two["launch"][0] == "srun" and two["srun"]["returncode"] == 0, two
    for node_id in range(2):
        node = json.loads((tmp_path / "probes" / f"train_2nodes.json.node{node_id}").read_text())
        assert node["env"]["SLURMD_NODENAME"] == NODES[node_id] and node["gpus"] == 8
        for flag in ("--nnodes=2", f"--node-rank={node_id}", f"--master-addr={NODES[0]}", "--nproc-per-node=8"):
            assert flag in node["launch"], (flag, node["launch"])


def _megabytes(text: str) -> float:
    """scontrol's memory (``64000M``, ``62.50G``, ``1000G``) in MB."""
    return round(float(text[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[text[-1]])


def _slurm_time(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60:02d}:{rest % 60:02d}:00"


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


# Every stage command of the training path, SP training included: the whole DAG runs through Snakemake
# at the rehearsal scale, and each kind of stage through DVC at the smoke scale (test_pipeline.py);
# here each of these kinds of job goes through sbatch once (the data stages after clip run on CPUs
# like download, which does).
TARGET = "evaluate_sp_s25"
TARGET_STAGES = {"corpus", "filter", "download", "clip", "base", "featnet", "encode", "train_mse", "freeze", "train_sp", "sample_sp_s25", TARGET}


# Over 90 s of work on 2 cores: more than a job trains before its stop signal (below).
MSE_STEPS = 600
SMOKE_RESOURCES = ("    default: {cpus: 1, mem_mb: 2000, runtime_min: 20}\n    base: {cpus: 2, mem_mb: 2000, runtime_min: 20}\n"
                   "    encode: {cpus: 2, mem_mb: 2000, runtime_min: 20}\n")


def _reference_training(copy: Path, folder: Path) -> subprocess.Popen:
    """train_mse's command, run uninterrupted outside SLURM (its inputs are there)."""
    folder.mkdir()
    command = [sys.executable, "-m", "selfperceptual", "train", "--data", str(copy / "runs/smoke/encode"), "--init", str(copy / "runs/smoke/base"),
               "--objective", "mse", "--conditioning", "text", "--checkpoints", str(folder / "checkpoints"), "--params", str(copy / "params.yaml"),
               "--scale", "smoke", "--out", str(folder / "train_mse")]
    with open(folder / "train_mse.log", "w") as log:  # one thread, as Snakemake gives the job
        return subprocess.Popen(command, cwd=folder, env={**environment(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)


def _through_slurm(copy: Path, env, *targets: str, timeout: float = 900) -> str:
    """Snakemake's output for ``targets`` through the SLURM profile, which must succeed."""
    command = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm", *LOCAL_SETTINGS, *targets]
    snakemake = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _finish(snakemake, env, timeout)
    assert snakemake.returncode == 0, output[-6000:]
    return output


def test_smoke_scale_runs_through_the_slurm_profile(slurm, tmp_path):
    """Each kind of smoke-scale job through sbatch; train_mse on a cluster whose longest job is 2
    minutes, less than its work: it runs as a chain of 2-minute jobs. SLURM itself signals each 30 s
    ahead of its limit (no scancel; SLURM checks limits every 30 s, so the signal comes 60-90 s into
    the job), the job checkpoints and exits 143, Snakemake's main process submits the next, and it
    resumes, to weights identical to an uninterrupted run's. The stages before and after it run
    without that limit, so that a loaded machine cannot stop them."""
    copy = copy_repository(tmp_path / "repo", scale="smoke")
    params = copy / "params.yaml"
    smoke_mse = "mse: {<<: *local_mse, num_steps: 20}"  # the smoke block's line (it merges the local block's)
    assert smoke_mse in params.read_text()
    text = params.read_text().replace(smoke_mse, f"mse: {{<<: *local_mse, num_steps: {MSE_STEPS}}}", 1)
    assert SMOKE_RESOURCES in text
    params.write_text(text)
    assert load_params(params, "smoke")[1].train.mse.num_steps == MSE_STEPS
    env = {**environment(), "SLURM_CONF": slurm["SLURM_CONF"]}
    since = _last_job_id(env)  # the module's other tests ran jobs on this cluster too
    cluster_file = copy / "cluster.yaml"  # the user's settings: not the default partition
    cluster_file.write_text("cluster: {partition: work}\n")
    _through_slurm(copy, env, "encode", "base")
    reference = _reference_training(copy, tmp_path / "reference")

    # A 2-minute max_runtime with a stop signal that fits it. Training needs 12 minutes at most (a
    # chain of 12 jobs); the other stages must fit the limit to be accepted at all.
    cluster_file.write_text("cluster: {partition: work, max_runtime: 2, stop_signal_lead_s: 30}\n")
    params.write_text(text.replace(SMOKE_RESOURCES, SMOKE_RESOURCES.replace("runtime_min: 20", "runtime_min: 2")
                                   + "    train: {cpus: 1, mem_mb: 2000, runtime_min: 12}\n", 1))
    output = _through_slurm(copy, env, "train_mse", timeout=1200)
    records = [record for record in _job_records(env, "train_mse") if int(record["JobId"]) > since]

    cluster_file.write_text("cluster: {partition: work}\n")
    params.write_text(text)
    _through_slurm(copy, env, TARGET)

    assert TARGET_STAGES <= {stage.name for stage in build_stages(load_params(copy / "params.yaml", "smoke")[1])}
    jobs = _jobs(env, since)
    assert set(jobs) == TARGET_STAGES, f"not run through sbatch: {sorted(TARGET_STAGES - set(jobs))}"
    assert {job["JobState"] for job in jobs.values()} == {"COMPLETED"}, {rule: job["JobState"] for rule, job in jobs.items()}
    assert {job["Partition"] for job in jobs.values()} == {"work"}
    assert jobs["base"]["NumCPUs"] == "2" and jobs["filter"]["NumCPUs"] == "1"  # params.yaml's resources
    for rule, job in jobs.items():  # the profile keeps every job's log
        assert (copy / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job['JobId']}.log").is_file(), rule
    metrics = json.loads((copy / "runs" / "smoke" / TARGET / "metrics.json").read_text())
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1

    # SLURM stopped the job ahead of its limit; it ended (a job SLURM stops has no time left to
    # restart in), and Snakemake's main process submitted another (the training rules' retries),
    # which resumed; as often as the work needed.
    assert len(records) >= 2 and "Trying to restart job" in output
    assert [record["JobState"] for record in records] == ["FAILED"] * (len(records) - 1) + ["COMPLETED"]
    assert {record["TimeLimit"] for record in records} == {"00:02:00"}  # FAILED, not TIMEOUT: stopped by the signal ahead of the limit
    log = "".join((copy / ".snakemake" / "slurm_logs" / "rule_train_mse" / f"{r['JobId']}.log").read_text() for r in records)
    for event in ("SIGTERM: stopping after this step", "training stopped by SIGTERM after step", "resuming from"):
        assert event in log, event
    # The last job went on from the step the one before it stopped after. That may be the last step
    # (the signal came after it: the checkpoint is saved, the stage's outputs are left to the next job).
    stopped_after = [int(step) for step in re.findall(r"training stopped by SIGTERM after step (\d+)", log)]
    resumed = json.loads((copy / "runs" / "smoke" / "train_mse" / "metrics.json").read_text())["resumed_from_step"]
    assert stopped_after and stopped_after == sorted(stopped_after)
    assert 0 < stopped_after[-1] <= resumed <= MSE_STEPS  # later only if a signal came while the last step's outputs were saved
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference" / "train_mse.log").read_text()[-4000:]
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    chained, whole = load_file(copy / "runs" / "smoke" / "train_mse" / unet), load_file(tmp_path / "reference" / "train_mse" / unet)
    assert chained.keys() == whole.keys() and all(torch.equal(chained[key], whole[key]) for key in whole)
