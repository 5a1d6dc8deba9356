"""What each Snakemake job asks a cluster for: params.yaml's per-stage resources plus the user's
cluster settings (partition, account, GPU type), which never live in code or in params.yaml.

The cluster settings are ``cluster:`` of the Snakemake config (``--configfile``, a profile), or
else of ``cluster.yaml`` at the repository root (example: workflow/profiles/slurm/cluster.example.yaml).
"""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER_FILE = "cluster.yaml"

CLUSTER_KEYS = {
    "partition": "partition of every job (SLURM's default partition when unset)",
    "gpu_partition": "partition of the jobs that ask for GPUs (default: partition)",
    "account": "account to charge (the plugin's guess when unset)",
    "gpu_model": "GPU type of the jobs that ask for GPUs, as your cluster names it, e.g. a100 (any type when unset)",
}


class ClusterSettingsError(ValueError):
    pass


def cluster_settings(raw) -> dict[str, str]:
    """Validates the ``cluster:`` block of the Snakemake config (absent: no settings)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ClusterSettingsError(f"cluster: must be a mapping of {', '.join(CLUSTER_KEYS)} (got {raw!r})")
    problems = [f"cluster.{key}: unknown key (known: {', '.join(CLUSTER_KEYS)})" for key in raw if key not in CLUSTER_KEYS]
    problems += [f"cluster.{key}: must be a string (got {value!r})" for key, value in raw.items() if key in CLUSTER_KEYS and not isinstance(value, str)]
    if problems:
        raise ClusterSettingsError("invalid cluster settings:\n" + "\n".join(problems))
    return dict(raw)


def read_cluster_file(path: str | Path):
    """The ``cluster:`` block of a settings file, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - {"cluster"}:
        raise ClusterSettingsError(f"{path}: want one top-level key, cluster: (see workflow/profiles/slurm/cluster.example.yaml)")
    return raw.get("cluster")


# A training job is sent SIGTERM this long before its time limit: it checkpoints and stops, and
# Snakemake resubmits it (the train rules' retries), so it resumes where it stopped.
STOP_SIGNAL_LEAD_S = 600
TRAIN_RETRIES = 3


def rule_resources(job, cluster: dict[str, str], command: str = "") -> dict:
    """Snakemake resources of one job (snakemake-executor-plugin-slurm's names) from a JobResources."""
    resources = {"mem_mb": job.mem_mb, "runtime": job.runtime_min}
    partition = cluster.get("partition")
    if job.nodes > 1:
        resources["nodes"] = job.nodes
        if not job.gpus:
            resources["tasks"] = job.nodes  # one per node (a GPU job gets SLURM's default: one per node)
    if command == "train":
        resources["slurm_extra"] = f"--signal=TERM@{STOP_SIGNAL_LEAD_S}"
    if job.gpus:
        resources["gpu"] = job.gpus * job.nodes  # sbatch --gpus counts the whole job's
        partition = cluster.get("gpu_partition", partition)
        if "gpu_model" in cluster:
            resources["gpu_model"] = cluster["gpu_model"]
    if partition:
        resources["slurm_partition"] = partition
    if "account" in cluster:
        resources["slurm_account"] = cluster["account"]
    return resources


def resource_table(config) -> str:
    """Markdown: what each stage command of a scale asks for, and how many jobs it makes."""
    from .dag import build_stages  # the DAG imports this module's neighbours; keep the import local

    jobs: dict[str, int] = {}
    for stage in build_stages(config):
        jobs[stage.command] = jobs.get(stage.command, 0) + 1
    lines = ["| stage | jobs | nodes | CPUs | memory | runtime | GPUs per node |", "|---|---|---|---|---|---|---|"]
    for command, count in jobs.items():
        job = config.resources.of(command)
        hours = f"{job.runtime_min / 60:g} h" if job.runtime_min >= 60 else f"{job.runtime_min} min"
        lines.append(f"| `{command}` | {count} | {job.nodes} | {job.cpus} | {job.mem_mb / 1000:g} GB | {hours} | {job.gpus or '—'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from .config import load_params

    print(resource_table(load_params("params.yaml", sys.argv[1] if len(sys.argv) > 1 else "paper")[1]))
