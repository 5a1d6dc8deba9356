"""How sure the report's numbers are: a bootstrap over the generated images of one run, and a t
interval over training seeds, both 95% and both from scipy.stats.

The bootstrap resamples image indices; rows sampled with the same seeds and captions are paired
by index, so a difference between two rows is resampled as a pair. FID is recomputed for each
resample against the fixed reference statistics. Precision and recall get no bootstrap: a
resample repeats images, and a repeated image is its own nearest neighbour, which breaks their
k-nearest-neighbour radii; their intervals come from seeds only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats

LEVEL = 0.95


class FrechetToReference:
    """FID of generated features against one reference (``mu``, ``sigma``), fast enough to repeat
    hundreds of times: the reference's matrix square root R is taken once, and then

        FID = |mu_g - mu|^2 + tr(S_g) + tr(sigma) - 2 tr sqrt(R S_g R),

    one symmetric eigendecomposition of size min(n, d) per call (R S_g R shares its non-zero
    eigenvalues with the n x n Gram matrix of R times the centred features). torch-fidelity's
    ``fid_statistics_to_metric`` takes ``scipy.linalg.sqrtm`` of a d x d product each call; the two
    agree (tests/test_intervals.py), and the point estimates in the report stay torch-fidelity's."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu = mu.double()
        values, vectors = torch.linalg.eigh(sigma.double())
        self.root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
        self.trace = float(torch.trace(sigma.double()))

    def __call__(self, features: torch.Tensor) -> float:
        features = features.double()
        n, d = features.shape
        mean = features.mean(0)
        centred = (features - mean).T / (n - 1) ** 0.5  # d x n: S_g = centred @ centred.T
        scaled = self.root @ centred
        gram = scaled.T @ scaled if n < d else scaled @ scaled.T
        cross = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
        return float(((mean - self.mu) ** 2).sum() + (centred**2).sum() + self.trace - 2 * cross)


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """A 95% interval of ``statistic(indices)`` from ``resamples`` draws of ``n`` image indices with
    replacement (scipy.stats.bootstrap): the resamples' 2.5-97.5% spread about their median, placed
    about the estimate on all ``n`` images. Centred so because a resample repeats images, which
    raises FID by a near-constant amount (a percentile interval could miss the estimate altogether);
    for a mean (alignment, layout) the median and the estimate agree, and nothing moves."""
    result = stats.bootstrap(
        (np.arange(n),), statistic, vectorized=False, n_resamples=resamples, confidence_level=LEVEL,
        method="percentile", random_state=np.random.default_rng(seed),
    )  # fmt: skip
    low, median, high = np.percentile(result.bootstrap_distribution, [50 * (1 - LEVEL), 50, 50 * (1 + LEVEL)])
    estimate = statistic(np.arange(n))
    return float(estimate + low - median), float(estimate + high - median)


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
