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
    hundreds of times: with R the reference's matrix square root (taken once, or passed in as
    featnet saves it),

        FID = |mu_g - mu|^2 + tr(S_g) + tr(sigma) - 2 tr sqrt(R S_g R),

    and R S_g R shares its non-zero eigenvalues with the Gram matrix of R times the centred
    features, of size min(n, d). ``resampler`` projects the features by R once, so that a
    resample costs one small eigendecomposition. torch-fidelity's ``fid_statistics_to_metric``
    takes ``scipy.linalg.sqrtm`` of a d x d product each call; the two agree
    (tests/test_claims.py), and the point estimates in the report stay torch-fidelity's. On a
    ``device`` (evaluate's GPU) the resamples' eigendecompositions run there, in float64."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, root: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mu = mu.double().to(self.device)
        self.root = (sigma_root(sigma) if root is None else root.double()).to(self.device)
        self.trace = float(torch.trace(sigma.double()))

    def resampler(self, features: torch.Tensor) -> Callable[[np.ndarray], float]:
        """``indices -> FID of features[indices]``."""
        features = features.double().to(self.device)
        projected = features @ self.root  # row i: R x_i (R is symmetric)
        d = features.shape[1]

        def fid(indices) -> float:
            indices = torch.as_tensor(indices, device=self.device)
            chosen, scaled = features[indices], projected[indices]
            n, mean = len(chosen), chosen.mean(0)
            centred = (scaled - scaled.mean(0)) / (n - 1) ** 0.5  # rows: R (x_i - mean), scaled
            gram = centred @ centred.T if n < d else centred.T @ centred
            cross = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
            spread = ((chosen - mean) ** 2).sum() / (n - 1)  # tr(S_g)
            return float(((mean - self.mu) ** 2).sum() + spread + self.trace - 2 * cross)

        return fid

    def __call__(self, features: torch.Tensor) -> float:
        return self.resampler(features)(np.arange(len(features)))


def sigma_root(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix (its negative rounding-error eigenvalues as 0)."""
    values, vectors = torch.linalg.eigh(sigma.double())
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


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
