"""The claims' verdicts are computed from the numbers: made-up evaluations where the paper is
right, where it is wrong, and where one run cannot tell, each give the verdicts they must."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from selfperceptual.pipeline.claims import (
    CLAIMS,
    CONTRADICTED,
    NOT_EVALUATED,
    SUPPORTED,
    UNRESOLVED,
    Difference,
    Evidence,
    RowRun,
    judge,
    verdict,
)
from selfperceptual.pipeline.evaluation import FrechetToReference
from selfperceptual.pipeline.intervals import bootstrap, over_seeds

DIM, IMAGES = 8, 300
ROWS = sorted({row for claim in CLAIMS for difference in claim.differences for row in difference.rows})


def _reference():
    features = torch.randn(2000, DIM, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return {"mu": features.mean(0), "sigma": torch.cov(features.T)}


def _evidence(shift: dict[str, float], seeds: int, metric: dict[str, dict[str, float]], near: dict[str, str] | None = None, rows=ROWS, offset=0):
    """Made-up runs: each row's features are the reference's distribution moved by ``shift[row]``
    (default 0.9; a larger move, a worse FID); ``near[row] = other`` puts each of its images beside
    ``other``'s image of the same index (the same layout); ``metric[row]`` holds recall and
    alignment (default 0.5), which vary by about 0.005 across seeds."""
    reference = _reference()
    fid = FrechetToReference(reference["mu"], reference["sigma"])
    runs = {}
    for seed in range(seeds):
        noise = {row: torch.randn(IMAGES, DIM, generator=torch.Generator().manual_seed(100_000 * offset + 1000 * seed + i)) for i, row in enumerate(rows)}
        for index, row in enumerate(rows):
            base = noise[(near or {}).get(row, row)]
            features = base * (0.9 if row in (near or {}) else 1.0) + shift.get(row, 0.9)
            wobble = 0.005 * float(torch.randn(1, generator=torch.Generator().manual_seed(seed * 7919 + index)))
            values = {key: value + wobble for key, value in metric.get(row, {"recall": 0.5, "alignment": 0.5}).items()}
            twin = rows.index((near or {}).get(row, row))  # the same layout: recognised alike
            draws = torch.rand(IMAGES, generator=torch.Generator().manual_seed(100_000 * offset + 5000 + 1000 * seed + twin))
            recognised = (draws < values["alignment"]).float()
            values["alignment"] = float(recognised.mean())  # as evaluate computes it
            resampled = fid.resampled(features, 200)  # as evaluate keeps them
            saved = {"features": features.numpy(), "alignment": recognised.numpy(), "fid_resamples": resampled.distribution, "fid_all": np.array([resampled.estimate])}
            runs.setdefault(row, []).append(RowRun({"fid": fid(features), "num_images": IMAGES, **values}, saved))
    return Evidence(runs, resamples=200, margins={"recall": 0.05, "alignment": 0.05})


PAPER_RIGHT = {  # FID order of the paper: MSE+CFG < SP+CFG < SP < MSE; the ablations worse than SP
    "shift": {"mse_cfg75_r07_s25": 0.0, "sp_cfg3_r07_s25": 0.2, "sp_s25": 0.4, "sp_s50": 0.4, "uncond_sp_s25": 0.4, "mse_s25": 0.8,
              "mse_s50": 0.8, "uncond_mse_s25": 0.8},
    "metric": {"mse_s25": {"recall": 0.5, "alignment": 0.5}, "sp_s25": {"recall": 0.5, "alignment": 0.51},
               "mse_cfg75_r07_s25": {"recall": 0.3, "alignment": 0.9}},
    "near": {"sp_s25": "mse_s25"},
}


def _verdicts(evidence):
    return {claim.key: found for claim, found, _ in judge(evidence)}


@pytest.mark.parametrize("seeds", [1, 3])
def test_where_the_paper_is_right_its_claims_are_supported(seeds):
    verdicts = _verdicts(_evidence(PAPER_RIGHT["shift"], seeds, PAPER_RIGHT["metric"], PAPER_RIGHT["near"]))
    # precision and recall have no image-level interval: one seed cannot resolve the diversity claim
    assert verdicts.pop("diversity") == (SUPPORTED if seeds > 1 else UNRESOLVED)
    assert set(verdicts.values()) == {SUPPORTED}, verdicts


def test_where_the_paper_is_wrong_its_claims_are_contradicted():
    shift = {**PAPER_RIGHT["shift"], "sp_s25": 1.2, "sp_s50": 1.2, "uncond_sp_s25": 1.2, "sp_cfg3_r07_s25": 1.6, "sp_layer_decoder_s25": 0.2}
    metric = {"mse_s25": {"recall": 0.5, "alignment": 0.5}, "sp_s25": {"recall": 0.3, "alignment": 0.8},
              "mse_cfg75_r07_s25": {"recall": 0.6, "alignment": 0.3}}
    verdicts = _verdicts(_evidence(shift, 3, metric, near={"mse_cfg75_r07_s25": "mse_s25"}))
    for key in ("sp_beats_mse", "sp_cfg_between", "sp_helps_uncond", "midblock_best", "diversity", "alignment", "layout"):
        assert verdicts[key] == CONTRADICTED, (key, verdicts)
    assert verdicts["cfg_beats_sp"] == SUPPORTED


@pytest.mark.parametrize("statistic", ["fid", "alignment", "layout"])
def test_rows_that_do_not_differ_are_rarely_resolved_the_intervals_cover(statistic):
    """Forty made-up single-seed runs in which SP and MSE do not differ: the 95% paired bootstrap
    interval of their difference should settle it one way or the other about 5% of the time."""
    difference = {"fid": Difference("fid", ("sp_s25",), ("mse_s25",), "<"),
                  "alignment": Difference("alignment", ("sp_s25",), ("mse_s25",), "="),
                  "layout": Difference("layout", ("mse_s25", "sp_s25"), ("mse_s25", "mse_cfg75_r07_s25"), "<")}[statistic]
    resolved = 0
    for replicate in range(40):
        evidence = _evidence({}, 1, {}, rows=["mse_s25", "sp_s25", "mse_cfg75_r07_s25"], offset=replicate)
        evidence.margins = {"recall": 0.0, "alignment": 0.0}  # "=": resolved only when the interval excludes 0, as for the others
        resolved += evidence.find(difference).verdict != UNRESOLVED
    assert resolved <= 6, f"{resolved} of 40 resolved"


def test_claims_whose_rows_were_not_run_are_not_evaluated():
    rows = [row for row in ROWS if "layer" not in row]
    verdicts = _verdicts(_evidence(PAPER_RIGHT["shift"], 1, PAPER_RIGHT["metric"], PAPER_RIGHT["near"], rows=rows))
    assert verdicts["midblock_best"] == NOT_EVALUATED and verdicts["sp_beats_mse"] == SUPPORTED


@pytest.mark.parametrize(
    ("claimed", "low", "high", "expected"),
    [("<", -3, -1, SUPPORTED), ("<", 1, 3, CONTRADICTED), ("<", -1, 1, UNRESOLVED), (">", 0.1, 0.2, SUPPORTED),
     ("=", -0.01, 0.02, SUPPORTED), ("=", 0.06, 0.2, CONTRADICTED), ("=", -0.01, 0.2, UNRESOLVED),
     (">=", -0.04, 0.3, SUPPORTED), (">=", -0.3, -0.06, CONTRADICTED), (">=", -0.3, 0.1, UNRESOLVED)],
)  # fmt: skip
def test_a_difference_is_judged_by_where_its_interval_lies(claimed, low, high, expected):
    assert verdict(claimed, low, high, margin=0.05) == expected


def test_the_fast_fid_equals_torch_fidelitys_and_its_interval_holds_the_estimate():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(500, 64, generator=generator) * 1.3, torch.randn(40, 64, generator=generator) + 0.2
    reference = fid_features_to_statistics(real.double())
    library = fid_statistics_to_metric(fid_features_to_statistics(fake.double()), reference, verbose=False)[KEY_METRIC_FID]
    fid = FrechetToReference(torch.from_numpy(reference["mu"]), torch.from_numpy(reference["sigma"]))
    assert fid(fake) == pytest.approx(library, rel=1e-7)  # n < d: through the n x n Gram matrix; scipy's sqrtm is good to ~1e-8
    assert fid(torch.cat([fake] * 3)) == pytest.approx(fid_statistics_to_metric(fid_features_to_statistics(torch.cat([fake] * 3).double()), reference, verbose=False)[KEY_METRIC_FID], rel=1e-7)  # n > d
    low, high = bootstrap(lambda images: fid(fake[images]), len(fake), 100)
    assert low < fid(fake) < high


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (evaluate's bootstrap runs on its device)")
def test_the_bootstrap_on_a_gpu_gives_the_cpus_interval():
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(3000, 256, generator=generator), torch.randn(600, 256, generator=generator) + 0.1
    reference = fid_features_to_statistics(real.double())
    mu, sigma = torch.from_numpy(reference["mu"]), torch.from_numpy(reference["sigma"])
    on_cpu, on_gpu = (FrechetToReference(mu, sigma, device=device).resampler(fake) for device in ("cpu", "cuda"))
    assert on_gpu(np.arange(600)) == pytest.approx(on_cpu(np.arange(600)), rel=1e-9)
    assert bootstrap(on_gpu, 600, 50) == pytest.approx(bootstrap(on_cpu, 600, 50), rel=1e-9)


def test_an_interval_over_seeds_is_students_t():
    mean, low, high = over_seeds([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == mean - low == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert over_seeds([5.0]) == (5.0, None, None)


def test_the_bootstrap_draws_scipys_resamples_and_centres_them_on_the_estimate():
    """intervals.draws are scipy.stats.bootstrap's draws for the same seed, so an interval is the
    library's percentile interval, moved by (estimate - median)."""
    from scipy import stats

    values = np.random.default_rng(3).gamma(2.0, size=150)
    statistic = lambda images: float(np.std(values[images]))  # noqa: E731 - a statistic whose resamples are biased
    library = stats.bootstrap((np.arange(150),), statistic, vectorized=False, n_resamples=300, method="percentile",
                              random_state=np.random.default_rng(0)).bootstrap_distribution  # fmt: skip
    low, median, high = np.percentile(library, [2.5, 50, 97.5])
    assert bootstrap(statistic, 150, 300) == (statistic(np.arange(150)) + low - median, statistic(np.arange(150)) + high - median)


def test_the_paired_fid_interval_from_evaluates_resamples_is_the_one_from_both_rows_features():
    """The report subtracts the FID resamples each evaluate kept; that must be the paired bootstrap
    of the difference computed from the two rows' features together (the same images drawn)."""
    reference = _reference()
    frechet = FrechetToReference(reference["mu"], reference["sigma"])
    generator = torch.Generator().manual_seed(5)
    first, second = torch.randn(IMAGES, DIM, generator=generator) + 0.3, torch.randn(IMAGES, DIM, generator=generator) + 0.5
    fid_first, fid_second = frechet.resampler(first), frechet.resampler(second)
    together = bootstrap(lambda images: fid_first(images) - fid_second(images), IMAGES, 120)
    assert (frechet.resampled(first, 120) - frechet.resampled(second, 120)).interval() == pytest.approx(together, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="unpaired"):
        frechet.resampled(first, 120) - frechet.resampled(second[:-1], 120)


def test_rows_of_different_sizes_get_no_paired_interval():
    evidence = _evidence(PAPER_RIGHT["shift"], 1, PAPER_RIGHT["metric"], rows=["mse_s25", "sp_s25"])
    evidence.runs["sp_s25"][0].metrics["num_images"] = IMAGES - 1
    finding = evidence.find(Difference("fid", ("sp_s25",), ("mse_s25",), "<"))
    assert (finding.verdict, finding.low) == (UNRESOLVED, None) and "different sizes" in finding.source

