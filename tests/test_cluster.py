"""Cluster resources: params.yaml's per-stage requests and the user's cluster settings on each job."""

import sys

import pytest
import yaml
from workspace import copy_repository, run

from selfperceptual.cluster import ClusterSettingsError, cluster_settings, rule_resources
from selfperceptual.config import load_params


def test_gpu_settings_go_only_to_jobs_that_ask_for_gpus(repo):
    resources = load_params(repo / "params.yaml", "paper")[1].resources
    cluster = cluster_settings({"partition": "cpu", "gpu_partition": "gpu", "account": "lab", "gpu_model": "a100"})
    train, report = rule_resources(resources.of("train"), cluster, "train"), rule_resources(resources.of("report"), cluster, "report")
    assert train == {"mem_mb": 512000, "runtime": 19260, "gpu": 8, "gpu_model": "a100", "slurm_partition": "gpu", "slurm_account": "lab",
                     "slurm_extra": "--signal=TERM@600"}
    two_nodes = rule_resources(resources.of("train").model_copy(update={"nodes": 2}), cluster, "train")
    assert (two_nodes["nodes"], two_nodes["gpu"]) == (2, 16) and "tasks" not in two_nodes  # SLURM's default: one task per node
    assert report == {"mem_mb": 4000, "runtime": 15, "slurm_partition": "cpu", "slurm_account": "lab"}
    assert rule_resources(resources.of("sample"), {})["gpu"] == 1 and "slurm_partition" not in rule_resources(resources.of("sample"), {})
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
    assert "gpu=2" in train_mse and "gpu_model=h100" in train_mse and "slurm_partition=gpu" in train_mse and "mem_mb=5000" in train_mse
    filter_job = _job(plan, "filter")
    assert "slurm_partition=cpu" in filter_job and "gpu" not in filter_job
    (copy / "cluster.yaml").write_text("cluster: {partiton: cpu}\n")
    result = run([sys.executable, "-m", "snakemake", "-n"], copy, check=False)
    assert result.returncode != 0 and "cluster.partiton: unknown key" in result.stdout + result.stderr


def test_readme_shows_what_the_paper_scale_asks_for(repo):
    from selfperceptual.cluster import resource_table

    table = resource_table(load_params(repo / "params.yaml", "paper")[1])
    assert "| `train` | 15 | 1 | 64 | 512 GB | 321 h | 8 |" in table
    assert table in (repo / "README.md").read_text(), "README's table is stale: python -m selfperceptual.cluster paper"
