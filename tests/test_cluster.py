"""Cluster resources: params.yaml's per-stage requests and the user's cluster settings on each job."""

import sys

import pytest
import yaml
from workspace import copy_repository, run

from selfperceptual.pipeline.cluster import STOP_SIGNAL_LEAD_S, TRAIN_RETRIES, ClusterSettingsError, chain_length, cluster_settings, retries, rule_resources, slurm_minutes
from selfperceptual.pipeline.config import load_params
from selfperceptual.pipeline.distributed import STOP_GRACE_S


def test_gpu_settings_go_only_to_jobs_that_ask_for_gpus(repo):
    resources = load_params(repo / "params.yaml", "paper")[1].resources
    cluster = cluster_settings({"partition": "cpu", "gpu_partition": "gpu", "account": "lab", "gpu_model": "a100"})
    train, report = rule_resources(resources.of("train"), cluster, "train"), rule_resources(resources.of("report"), cluster, "report")
    assert train == {"mem_mb": 512000, "runtime": 19260, "gres": "gpu:a100:8", "gpu_devices": 8, "slurm_partition": "gpu", "slurm_account": "lab",
                     "slurm_extra": "--signal=TERM@600"}
    two_nodes = rule_resources(resources.of("train").model_copy(update={"nodes": 2}), cluster, "train")
    assert (two_nodes["nodes"], two_nodes["gres"], two_nodes["gpu_devices"]) == (2, "gpu:a100:8", 16) and "tasks" not in two_nodes  # per node; one task per node
    assert report == {"mem_mb": 4000, "runtime": 15, "slurm_partition": "cpu", "slurm_account": "lab"}
    assert rule_resources(resources.of("sample"), {})["gres"] == "gpu:1" and "slurm_partition" not in rule_resources(resources.of("sample"), {})
    with pytest.raises(ClusterSettingsError, match="cluster.partiton: unknown key"):
        cluster_settings({"partiton": "cpu"})


def _job(plan: str, rule: str) -> str:
    start = plan.index(f"rule {rule}:")
    return plan[start : plan.find("\n[", start)]


def test_the_plan_splits_stages_and_carries_resources(tmp_path):
    """snakemake -n with num_jobs > 1 and a cluster.yaml: the split jobs, their consumers, and the sbatch resources."""
    copy = copy_repository(tmp_path, scale="smoke")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["smoke"]["download"]["num_jobs"] = 2
    params["smoke"]["encode"]["num_jobs"] = 3
    params["smoke"]["sample"]["num_jobs"] = 2
    params["smoke"]["resources"]["train"] = {"cpus": 2, "mem_mb": 5000, "runtime_min": 90, "gpus": 2}
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (copy / "cluster.yaml").write_text("cluster: {partition: cpu, gpu_partition: gpu, gpu_model: h100}\n")
    plan = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], copy).stdout
    for job in ("download_part0", "download_part1", "encode_part2", "sample_sp_s25_part1"):
        assert f"rule {job}:" in plan
    assert "rule download:" not in plan and "rule encode:" not in plan
    train_mse = _job(plan, "train_mse")
    assert "input: runs/smoke/encode_part0, runs/smoke/encode_part1, runs/smoke/encode_part2, runs/smoke/base" in train_mse
    assert "gres=gpu:h100:2" in train_mse and "slurm_partition=gpu" in train_mse and "mem_mb=5000" in train_mse
    filter_job = _job(plan, "filter")
    assert "slurm_partition=cpu" in filter_job and "gpu" not in filter_job
    (copy / "cluster.yaml").write_text("cluster: {partiton: cpu}\n")
    result = run([sys.executable, "-m", "snakemake", "-n"], copy, check=False)
    assert result.returncode != 0 and "cluster.partiton: unknown key" in result.stdout + result.stderr


def test_readme_shows_what_the_paper_scale_asks_for(repo):
    from selfperceptual.pipeline.cluster import resource_table

    table = resource_table(load_params(repo / "params.yaml", "paper")[1], {"max_runtime": "2-00:00:00"})
    assert "| `train` | 15 | 1 | 64 | 512 GB | 8 | 321 h | 7 | 48 h |" in table
    assert table in (repo / "docs" / "cluster.md").read_text(), "docs/cluster.md's table is stale: python -m selfperceptual.pipeline.cluster paper --max-runtime 2-00:00:00"


def test_training_longer_than_the_clusters_limit_runs_as_a_chain_of_jobs(repo):
    """Each job of the chain asks for the cluster's max_runtime; together, minus each job's stop lead
    and resume allowance, they cover the stage's time; a stage that cannot be chained is refused."""
    assert [slurm_minutes(value) for value in ("2-00:00:00", "48:00:00", "90", "1:30", "2-12", 720)] == [2880, 2880, 90, 2, 3600, 720]
    with pytest.raises(ClusterSettingsError, match="cluster.max_runtime: '2 days' is not a SLURM time"):
        cluster_settings({"max_runtime": "2 days"})
    resources = load_params(repo / "params.yaml", "paper")[1].resources
    train, cluster = resources.of("train"), cluster_settings({"max_runtime": "2-00:00:00"})
    jobs = chain_length(train, cluster)
    usable = 2880 - STOP_SIGNAL_LEAD_S / 60 - 15
    assert (jobs - 1) * usable < train.runtime_min <= jobs * usable
    assert rule_resources(train, cluster, "train")["runtime"] == 2880
    assert retries(train, cluster, "train") == jobs - 1 + TRAIN_RETRIES and retries(train, {}, "train") == TRAIN_RETRIES
    assert chain_length(train, {}) == 1 and retries(resources.of("sample"), cluster, "sample") == 0
    assert STOP_SIGNAL_LEAD_S >= STOP_GRACE_S  # torchrun's grace for the stop checkpoint fits between the signal and the limit
    with pytest.raises(ClusterSettingsError, match=r"resources.download.runtime_min \(1440\) is over cluster.max_runtime"):
        rule_resources(resources.of("download"), cluster_settings({"max_runtime": "12:00:00"}), "download")
