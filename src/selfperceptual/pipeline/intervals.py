"""How sure the report's numbers are: a bootstrap over the generated images of one run, and a t
interval over training seeds, both 95%. numpy and scipy only: the report, which reads these,
imports no torch.

The bootstrap resamples image indices (``draws``: scipy.stats.bootstrap's own draws, which
tests/test_claims.py checks). Every row of n images draws the same indices, and rows sampled with
the same seeds and captions hold the same image at an index, so the difference of two rows'
``Resampled`` statistics is a paired bootstrap, resample by resample. That is how FID's
resamples, which need the evaluation network's features and a d x d eigendecomposition each, are
taken once in the evaluate stage (on its GPU at the paper scale: ``evaluation.FrechetToReference``)
and kept in its ``features.safetensors``; the report subtracts them. Precision and recall get no
bootstrap: a resample repeats images, and a repeated image is its own nearest neighbour, which
breaks their k-nearest-neighbour radii; their intervals come from seeds only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


def draws(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``resamples`` draws of ``n`` image indices with replacement, shape (resamples, n)."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


@dataclass(frozen=True)
class Resampled:
    """A statistic of ``n`` images on all of them (``estimate``) and on each of ``draws(n, R)``."""

    n: int
    estimate: float
    distribution: np.ndarray  # (R,)

    def __sub__(self, other: Resampled) -> Resampled:
        """The paired difference: the same draws of the same image indices on both sides."""
        if (self.n, len(self.distribution)) != (other.n, len(other.distribution)):
            raise ValueError(f"unpaired resamples: {self.n} images x {len(self.distribution)} draws against "
                             f"{other.n} x {len(other.distribution)}")  # fmt: skip
        return Resampled(self.n, self.estimate - other.estimate, self.distribution - other.distribution)

    def interval(self) -> tuple[float, float]:
        """The 95% interval: the resamples' 2.5-97.5% spread about their median, placed about the
        estimate on all images. Centred so because a resample repeats images, which raises FID by
        a near-constant amount (a percentile interval could miss the estimate altogether); for a
        mean (alignment, layout) the median and the estimate agree, and nothing moves."""
        low, median, high = np.percentile(self.distribution, [50 * (1 - LEVEL), 50, 50 * (1 + LEVEL)])
        return float(self.estimate + low - median), float(self.estimate + high - median)


def resample(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int = 0) -> Resampled:
    """``statistic(indices)`` on all ``n`` images and on each draw."""
    distribution = np.array([statistic(indices) for indices in draws(n, resamples, seed)], dtype=np.float64)
    return Resampled(n, float(statistic(np.arange(n))), distribution)


def resample_mean(values: np.ndarray, resamples: int, seed: int = 0) -> Resampled:
    """The mean of per-image ``values`` (alignment, layout distances), all draws at once."""
    values = np.asarray(values, dtype=np.float64)
    return Resampled(len(values), float(values.mean()), values[draws(len(values), resamples, seed)].mean(axis=1))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """A 95% interval of ``statistic(indices)`` from ``resamples`` draws of ``n`` image indices."""
    return resample(statistic, n, resamples, seed).interval()


def over_seeds(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean and 95% t interval of one number measured once per training seed; no interval from one seed."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    spread = stats.sem(values)
    if spread == 0:  # every seed gave the same number
        return mean, mean, mean
    low, high = stats.t.interval(LEVEL, len(values) - 1, loc=mean, scale=spread)
    return mean, float(low), float(high)
