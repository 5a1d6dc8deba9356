"""What each Snakemake job asks a cluster for: params.yaml's per-stage resources plus the user's
cluster settings (partition, account, GPU type, the longest job the cluster allows), which never
live in code or in params.yaml.

GPUs are asked for per node (``--gres=gpu[:type]:N``), the way a node's GPUs are counted: with a
job-wide ``--gpus`` the step the SLURM executor starts inside a two-node job cannot be made
("Invalid generic resource specification"), which SLURM showed on GPU-shaped test nodes.

A training stage that needs more time than the cluster's ``max_runtime`` runs as a chain of jobs:
each asks for ``max_runtime``, is sent SIGTERM ``STOP_SIGNAL_LEAD_S`` before its end, checkpoints
and stops; Snakemake submits the next (the rule's retries), which resumes from that checkpoint.

The cluster settings are ``cluster:`` of the Snakemake config (``--configfile``, a profile), or
else of ``cluster.yaml`` at the repository root (example: workflow/profiles/slurm/cluster.example.yaml).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

CLUSTER_FILE = "cluster.yaml"

CLUSTER_KEYS = {
    "partition": "partition of every job (SLURM's default partition when unset)",
    "gpu_partition": "partition of the jobs that ask for GPUs (default: partition)",
    "account": "account to charge (the plugin's guess when unset)",
    "gpu_model": "GPU type of the jobs that ask for GPUs, as your cluster names it, e.g. a100 (any type when unset)",
    "max_runtime": "the longest time limit a job may ask for, in SLURM's format, e.g. 2-00:00:00 or 48:00:00 (no limit when unset)",
    "stop_signal_lead_s": "seconds before its time limit that a training job is told to checkpoint and stop (default 600)",
}
TIME_KEYS = {"max_runtime", "stop_signal_lead_s"}  # the keys that are not strings


class ClusterSettingsError(ValueError):
    pass


def cluster_settings(raw) -> dict:
    """Validates the ``cluster:`` block of the Snakemake config (absent: no settings)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ClusterSettingsError(f"cluster: must be a mapping of {', '.join(CLUSTER_KEYS)} (got {raw!r})")
    problems = [f"cluster.{key}: unknown key (known: {', '.join(CLUSTER_KEYS)})" for key in raw if key not in CLUSTER_KEYS]
    problems += [f"cluster.{key}: must be a string (got {value!r})" for key, value in raw.items()
                 if key in CLUSTER_KEYS and key not in TIME_KEYS and not isinstance(value, str)]
    if "max_runtime" in raw:
        try:
            slurm_minutes(raw["max_runtime"])
        except ValueError as error:
            problems.append(f"cluster.max_runtime: {error}")
    lead = raw.get("stop_signal_lead_s", STOP_SIGNAL_LEAD_S)
    if not isinstance(lead, int) or isinstance(lead, bool) or lead <= 0:
        problems.append(f"cluster.stop_signal_lead_s: must be a positive number of seconds (got {lead!r})")
    if problems:
        raise ClusterSettingsError("invalid cluster settings:\n" + "\n".join(problems))
    return dict(raw)


_SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def slurm_minutes(value) -> int:
    """Minutes of a SLURM time: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``
    (sbatch's formats), or an integer of minutes; seconds round up."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SLURM_TIME.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, parts = int(match["days"] or 0), [int(part) for part in (match["a"], match["b"], match["c"]) if part is not None]
    if match["days"]:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # H:M:S
        hours, minutes, seconds = parts
    else:  # M, M:S
        hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
    total = days * 1440 + hours * 60 + minutes + math.ceil(seconds / 60)
    if total <= 0:
        raise ValueError(f"{value!r} is not a positive time")
    return total


def read_cluster_file(path: str | Path):
    """The ``cluster:`` block of a settings file, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - {"cluster"}:
        raise ClusterSettingsError(f"{path}: want one top-level key, cluster: (see workflow/profiles/slurm/cluster.example.yaml)")
    return raw.get("cluster")


# A training job is sent SIGTERM this long before its time limit (by default; cluster.stop_signal_lead_s):
# it checkpoints and stops, and Snakemake submits it again (the train rules' retries), so it resumes
# where it stopped. At least distributed.STOP_GRACE_S, the time torchrun gives its workers for that
# checkpoint, unless the checkpoints are small.
STOP_SIGNAL_LEAD_S = 600
RESUME_ALLOWANCE_MIN = 15  # per job of a chain (a quarter of a shorter limit): start-up, loading the checkpoint
TRAIN_RETRIES = 3  # failures a training stage survives besides its chain's planned resubmissions


def max_runtime_min(cluster: dict) -> int | None:
    return slurm_minutes(cluster["max_runtime"]) if "max_runtime" in cluster else None


def stop_signal_lead_s(cluster: dict) -> int:
    return cluster.get("stop_signal_lead_s", STOP_SIGNAL_LEAD_S)


def chain_length(job, cluster: dict) -> int:
    """Jobs a training stage of ``job.runtime_min`` runs as under the cluster's ``max_runtime``: each
    gives up the stop signal's lead and a resume allowance of its time limit."""
    limit = max_runtime_min(cluster)
    if limit is None or job.runtime_min <= limit:
        return 1
    usable = limit - stop_signal_lead_s(cluster) / 60 - min(RESUME_ALLOWANCE_MIN, limit / 4)
    if usable <= 0:
        raise ClusterSettingsError(f"cluster.max_runtime ({cluster['max_runtime']}) leaves no time to train after the stop signal's "
                                   f"lead of {stop_signal_lead_s(cluster)} s and a resume allowance")
    return math.ceil(job.runtime_min / usable)


def retries(job, cluster: dict, command: str) -> int:
    """Snakemake retries of a stage: a training stage's chain resubmissions plus TRAIN_RETRIES."""
    return chain_length(job, cluster) - 1 + TRAIN_RETRIES if command == "train" else 0


def rule_resources(job, cluster: dict, command: str = "") -> dict:
    """Snakemake resources of one job (snakemake-executor-plugin-slurm's names) from a JobResources."""
    runtime, limit = job.runtime_min, max_runtime_min(cluster)
    if limit is not None and runtime > limit:
        if command != "train":
            raise ClusterSettingsError(f"resources.{command}.runtime_min ({runtime}) is over cluster.max_runtime ({cluster['max_runtime']}, "
                                       f"{limit} min): only training runs as a chain of jobs; split {command} into more jobs (num_jobs)")
        runtime = limit  # a chain of jobs at the limit (chain_length)
    resources = {"mem_mb": job.mem_mb, "runtime": runtime}
    partition = cluster.get("partition")
    if job.nodes > 1:
        resources["nodes"] = job.nodes
        if not job.gpus:
            resources["tasks"] = job.nodes  # one per node (a GPU job gets SLURM's default: one per node)
    if command == "train":
        resources["slurm_extra"] = f"--signal=TERM@{stop_signal_lead_s(cluster)}"
    if job.gpus:
        # Per node, as --gres counts them (a job-wide --gpus breaks the executor's step on two nodes).
        resources["gres"] = f"gpu:{cluster['gpu_model']}:{job.gpus}" if "gpu_model" in cluster else f"gpu:{job.gpus}"
        # For a machine's own scheduling (snakemake --resources gpu_devices=N runs at most N GPUs' worth
        # of jobs at once); a name the SLURM executor does not read, unlike gpu and gpus.
        resources["gpu_devices"] = job.gpus * job.nodes
        partition = cluster.get("gpu_partition", partition)
    if partition:
        resources["slurm_partition"] = partition
    if "account" in cluster:
        resources["slurm_account"] = cluster["account"]
    return resources


def _duration(minutes: int) -> str:
    return f"{minutes / 60:g} h" if minutes >= 60 else f"{minutes} min"


def resource_table(config, cluster: dict | None = None) -> str:
    """Markdown: what each stage command of a scale asks for, how many stages it makes, and under
    the cluster's ``max_runtime`` how many jobs each of them runs as and each job's time limit."""
    from .dag import build_stages  # the DAG imports this module's neighbours; keep the import local

    cluster = cluster or {}
    stages: dict[str, int] = {}
    for stage in build_stages(config):
        stages[stage.command] = stages.get(stage.command, 0) + 1
    lines = ["| stage | stages | nodes | CPUs | memory | GPUs per node | time per stage | jobs per stage | time limit per job |",
             "|---|---|---|---|---|---|---|---|---|"]
    for command, count in stages.items():
        job = config.resources.of(command)
        chain = chain_length(job, cluster) if command == "train" else 1
        limit = rule_resources(job, cluster, command)["runtime"]
        lines.append(f"| `{command}` | {count} | {job.nodes} | {job.cpus} | {job.mem_mb / 1000:g} GB | {job.gpus or '—'} | "
                     f"{_duration(job.runtime_min)} | {chain} | {_duration(limit)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from .config import load_params

    parser = argparse.ArgumentParser(description="What each stage command of a scale asks a SLURM cluster for.")
    parser.add_argument("scale", nargs="?", default="paper")
    parser.add_argument("--max-runtime", help="the cluster's longest job (SLURM time, e.g. 2-00:00:00); default: cluster.yaml's, else none")
    arguments = parser.parse_args()
    settings = cluster_settings(read_cluster_file(CLUSTER_FILE)) if arguments.max_runtime is None else {"max_runtime": arguments.max_runtime}
    print(resource_table(load_params("params.yaml", arguments.scale)[1], cluster_settings(settings)))
