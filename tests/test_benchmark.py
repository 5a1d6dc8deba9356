"""The benchmarks run and print their figures. Timings are not asserted (they belong to the
benchmark, not to the tests); the data-scaling memory ratio is, since memory is not noise."""

import re
import subprocess
import sys

import pytest


def test_sp_step_benchmark_prints_a_row_per_variant_and_its_round(repo):
    # One round: each variant is a process of its own (about 10 s of imports each on 2 cores).
    command = [sys.executable, "benchmarks/sp_step.py", "--batch", "4", "--warmup", "0", "--repeats", "1", "--rounds", "1"]
    printed = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    assert len(re.findall(r"^round \d: mse [\d.]+s  sp/mse [\d.]+  naive/mse [\d.]+  lpl/mse [\d.]+  casdm/mse [\d.]+$", printed, re.MULTILINE)) == 1
    rows = {m[0]: m[1:] for m in re.findall(r"^(mse|sp|naive|lpl|casdm)\s+([\d.]+)s\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", printed, re.MULTILINE)}
    assert set(rows) == {"mse", "sp", "naive", "lpl", "casdm"}
    assert rows["mse"][1] == "1.00" and rows["mse"][3] == "1.00"  # ratios are to the MSE step of the same round
    assert all(float(row[0]) > 0 and int(row[2]) > 0 for row in rows.values())


def test_training_memory_does_not_grow_with_the_data(repo):
    """benchmarks/data_scaling.py: 20x the samples, the same peak memory (the training set streams)."""
    command = [sys.executable, "benchmarks/data_scaling.py", "--samples", "200", "--factor", "20", "--steps", "3"]
    printed = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    assert re.search(r"^ 20x  samples    4000 ", printed, re.MULTILINE)
    ratio = float(re.search(r"^rss_ratio=([\d.]+)$", printed, re.MULTILINE).group(1))
    assert ratio <= 1.1, printed


def test_train_throughput_benchmark_times_the_training_loop_per_objective(repo):
    """benchmarks/train_throughput.py at the smoke shape: a row per objective from the real loop, FLOPs
    counted on each objective's own step (SP's frozen network and the peers' decoders cost more than MSE)."""
    command = [sys.executable, "benchmarks/train_throughput.py", "--warmup", "1", "--steps", "2", "--samples", "64", "--peak-tflops", "1"]
    printed = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    rows = {m[0]: m[1:] for m in re.findall(r"^(mse|sp|lpl|casdm)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%  16/16$", printed, re.MULTILINE)}
    assert set(rows) == {"mse", "sp", "lpl", "casdm"}, printed
    images_per_s, flops = {name: float(row[0]) for name, row in rows.items()}, {name: float(row[1]) for name, row in rows.items()}
    assert all(value > 0 for value in images_per_s.values())
    assert flops["mse"] < flops["sp"] < flops["casdm"] and flops["mse"] <= flops["lpl"]  # LPL decodes only the samples below its t threshold
    assert all(0 <= float(row[4]) <= 100 for row in rows.values())  # the share of loop time spent waiting for data
    assert re.search(r"^time per image over MSE's: mse/mse 1\.00  sp/mse [\d.]+  lpl/mse [\d.]+  casdm/mse [\d.]+$", printed, re.MULTILINE)


def test_startup_benchmark_times_each_stage_against_another_source_tree(repo):
    """benchmarks/startup.py: a row per stage asked for, with the other tree's time and the ratio."""
    command = [sys.executable, "benchmarks/startup.py", "--runs", "1", "--vs", "src", "corpus", "filter"]
    printed = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    rows = re.findall(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", printed, re.MULTILINE)
    assert [row[0] for row in rows] == ["(--help)", "corpus", "filter"], printed
    assert all(float(here) > 0 and float(there) > 0 and float(ratio) > 0 for _, here, there, ratio in rows)


@pytest.mark.parametrize("stage", ["corpus", "filter", "download", "report"])
def test_the_stages_that_run_no_model_start_without_torch(stage):
    """torch's import is about half of a model stage's start-up. The report reads FID's resamples
    from the evaluations (numpy); download keeps torch out of webdataset, which img2dataset imports
    (its workers import the stage's module first, and so start without it too). A later import of
    torch in the same process still works."""
    code = (f"import sys; import selfperceptual.pipeline.stages.{stage}; print('torch' in sys.modules); "
            "import torch; print(torch.ones(2).sum().item())")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "2.0"]
