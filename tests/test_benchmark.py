"""The benchmarks run and print their figures. Timings are not asserted (they belong to the
benchmark, not to the tests); the data-scaling memory ratio is, since memory is not noise."""

import re
import subprocess
import sys


def test_sp_step_benchmark_prints_a_row_per_variant_and_each_round(repo):
    command = [sys.executable, "benchmarks/sp_step.py", "--batch", "4", "--warmup", "0", "--repeats", "1", "--rounds", "2"]
    printed = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout
    assert len(re.findall(r"^round \d: mse [\d.]+s  sp/mse [\d.]+  naive/mse [\d.]+  lpl/mse [\d.]+  casdm/mse [\d.]+$", printed, re.MULTILINE)) == 2
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
