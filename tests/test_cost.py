"""The cost table: FLOPs counted on SD 2.1-base's real architectures, and the paper's time limits
that follow from them."""

import pytest

from selfperceptual.pipeline.config import load_params
from selfperceptual.pipeline.cost import MARGIN, PEAK_BF16_TFLOPS, estimate, network_flops, time_limits, train_flops_per_image

# One pytest-xdist worker for the module: the FLOP counts of SD 2.1-base's networks (about 30 s of
# counting on the meta device) are cached in the process, and each test here needs them.
pytestmark = pytest.mark.xdist_group("cost")


@pytest.fixture(scope="module")
def paper(repo):
    from selfperceptual.pipeline.config import load_params

    return load_params(repo / "params.yaml", "paper")[1]


def test_counts_match_the_known_shape_of_the_sp_step(paper):
    counts = network_flops(512)
    assert 0.75e12 < counts["unet_forward"] < 0.85e12  # SD 2.1-base's UNet at 64x64 latents, 77 tokens
    assert counts["unet_train"] == pytest.approx(3 * counts["unet_forward"], rel=0.02)  # forward + two backward matmuls
    # DESIGN: f* up to the mid block costs about 0.3 of a full forward
    assert 0.2 < counts["frozen_forward"] / counts["unet_forward"] < 0.45
    settings = paper.train
    mse, sp = train_flops_per_image(512, "mse", settings.mse), train_flops_per_image(512, "sp", settings.sp)
    assert 1.2 < sp / mse < 1.5
    decoder = settings.sp.model_copy(update={"layer": "decoder"})
    assert train_flops_per_image(512, "sp", decoder) > sp  # the decoder ablation keeps the up blocks


def test_paper_time_limits_follow_from_the_cost_table(paper):
    jobs = estimate(paper, PEAK_BF16_TFLOPS["a100"], 0.3, 3_000_000, None)
    limits = time_limits(jobs)
    for command, minutes in limits.items():
        assert paper.resources.of(command).runtime_min == minutes, command
    slowest = max(job.hours_per_job for job in jobs if job.command == "train")
    assert limits["train"] >= slowest * MARGIN * 60


def test_a_measured_throughput_replaces_the_flop_estimate(paper):
    measured = {job.stage: job for job in estimate(paper, PEAK_BF16_TFLOPS["h100"], 0.3, 3_000_000, measured_images_per_s=50.0)}
    steps = paper.train.mse.num_steps * paper.train.global_batch
    assert measured["train_mse"].gpu_hours == pytest.approx(steps / 50.0 / 3600)
    assert measured["train_sp"].gpu_hours > measured["train_mse"].gpu_hours * paper.train.sp.num_steps / paper.train.mse.num_steps


def test_the_workstation_scale_is_about_a_day_of_one_gpu(repo):
    """On one H100 at 30% of its peak, by the FLOP count: about a day in all, every job one GPU, and
    params.yaml's time limits what the cost table gives."""
    workstation = load_params(repo / "params.yaml", "workstation")[1]
    jobs = estimate(workstation, PEAK_BF16_TFLOPS["h100"], 0.3, 3_000_000, None)
    assert 18 < sum(job.gpu_hours for job in jobs) < 30
    assert {job.gpus for job in jobs} == {1}
    for command, minutes in time_limits(jobs).items():
        assert workstation.resources.of(command).runtime_min == minutes, command
