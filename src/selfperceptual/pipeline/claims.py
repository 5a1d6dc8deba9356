"""The paper's claims as data, and a verdict for each, computed from this run's numbers.

A claim is one or more differences between sampling rows, each claimed to be below zero (``<``),
above it (``>``), within ``report.equivalence_margins`` (per statistic) of it (``=``: "leaves unchanged"), or not
below it by more than the margin (``>=``: "keeps", "does not lower"). Each difference gets a 95% interval (``intervals.py``): over training seeds when every
row it needs has two or more, else a paired bootstrap over the images of one run where the
statistic allows one. A difference is

- supported when its interval lies wholly on the claimed side (``=``: wholly inside the margin;
  ``>=``: wholly above minus the margin),
- contradicted when it lies wholly on the other side (``=``: wholly outside the margin; ``>=``:
  wholly below minus the margin),
- not resolved otherwise, or when it has no interval;

and a claim is contradicted when any of its differences is, supported when all are, and not
resolved otherwise. A claim whose rows were not run (``snakemake report`` of a partial DAG) is
not evaluated. The verdicts are never written by hand: tests/test_claims.py feeds made-up numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .intervals import FrechetToReference, bootstrap, over_seeds

SUPPORTED, CONTRADICTED, UNRESOLVED, NOT_EVALUATED = "supported", "contradicted", "not resolved at this scale", "not evaluated"


@dataclass(frozen=True)
class Difference:
    """``statistic`` of ``a`` minus that of ``b``. For ``layout`` each side is a pair of rows: the
    mean distance between their features for the same seed and caption."""

    statistic: str  # fid | precision | recall | alignment | layout
    a: tuple[str, ...]
    b: tuple[str, ...]
    claimed: str  # "<" | ">" | "=" | ">="

    @property
    def rows(self) -> set[str]:
        return {*self.a, *self.b}

    def describe(self) -> str:
        side = {"<": "<", ">": ">", "=": "≈", ">=": "≳"}[self.claimed]
        show = (lambda rows: " vs ".join(rows)) if self.statistic == "layout" else (lambda rows: rows[0])
        return f"{self.statistic}({show(self.a)}) {side} {self.statistic}({show(self.b)})"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the paper's claim, where it makes it
    differences: tuple[Difference, ...]


def _lower_fid(better: str, *worse: str) -> tuple[Difference, ...]:
    return tuple(Difference("fid", (better,), (other,), "<") for other in worse)


CLAIMS = (
    Claim("sp_beats_mse", "SP beats MSE without guidance (Table 1)", _lower_fid("sp_s25", "mse_s25") + _lower_fid("sp_s50", "mse_s50")),
    Claim("cfg_beats_sp", "MSE with CFG 7.5 and rescale 0.7 beats SP (Table 1)", _lower_fid("mse_cfg75_r07_s25", "sp_s25")),
    Claim(
        "sp_cfg_between",
        "SP with CFG (3.0, rescale 0.7) lies between SP and MSE with CFG (Table 7)",
        _lower_fid("sp_cfg3_r07_s25", "sp_s25") + _lower_fid("mse_cfg75_r07_s25", "sp_cfg3_r07_s25"),
    ),
    Claim("sp_helps_uncond", "SP improves unconditional generation (Table 8)", _lower_fid("uncond_sp_s25", "uncond_mse_s25")),
    Claim(
        "midblock_best",
        "The mid block is the best layer for the perceptual loss (Table 2)",
        _lower_fid("sp_s25", "sp_layer_encoder_s25", "sp_layer_decoder_s25", "sp_layer_encoder_midblock_s25"),
    ),
    Claim("uniform_best", "Uniform t' is the best choice of t' (Table 3)", _lower_fid("sp_s25", "sp_tprime_near40_s25", "sp_tprime_normal100_s25")),
    Claim("sp_beats_sp2", "sp beats the sp2 formulation (Table 5)", _lower_fid("sp_s25", "sp_formulation_sp2_s25")),
    Claim("mse_network_better", "The MSE model is the better perceptual network (Table 6)", _lower_fid("sp_s25", "sp_round2_s25")),
    Claim(
        "diversity",
        "SP keeps diversity (recall) while CFG lowers it (Sec. 4.1)",
        (Difference("recall", ("sp_s25",), ("mse_s25",), ">="), Difference("recall", ("mse_cfg75_r07_s25",), ("mse_s25",), "<")),
    ),
    Claim(
        "alignment",
        "SP leaves text alignment unchanged while CFG raises it (Sec. 1, 4.1)",
        (Difference("alignment", ("sp_s25",), ("mse_s25",), "="), Difference("alignment", ("mse_cfg75_r07_s25",), ("mse_s25",), ">")),
    ),
    Claim(
        "layout",
        "SP keeps the layout of MSE's samples, CFG changes it (Sec. 4.1, Fig. 3-4)",
        (Difference("layout", ("mse_s25", "sp_s25"), ("mse_s25", "mse_cfg75_r07_s25"), "<"),),
    ),
)


@dataclass
class RowRun:
    """One sampling row of one training seed: its metrics.json and its features.safetensors."""

    metrics: dict
    features: torch.Tensor
    alignment: torch.Tensor | None = None  # per image: recognised (0/1), or its CLIP score


@dataclass(frozen=True)
class Finding:
    difference: Difference
    estimate: float | None
    low: float | None
    high: float | None
    source: str  # "seeds (n)" | "images (bootstrap)" | why there is no interval
    verdict: str


def twin_distances(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The feature distance of each sample of one row to its twin in another: the sample of the
    same index, drawn from the same seed and caption (``sample`` seeds image i with seed + i)."""
    n = min(len(first), len(second))
    return (first[:n] - second[:n]).norm(dim=1)


class Evidence:
    """Every row's runs (one per training seed) and the reference statistics, with the intervals
    of the differences the claims name."""

    def __init__(self, runs: dict[str, list[RowRun]], reference: dict[str, torch.Tensor], resamples: int, margins: dict[str, float]):
        self.runs, self.resamples, self.margins = runs, resamples, margins  # statistic -> margin of its "=" and ">="
        self.fid = FrechetToReference(reference["mu"], reference["sigma"], reference.get("sigma_root"))
        self._fid_of: dict[int, Callable[[np.ndarray], float]] = {}  # id(run) -> its resampler

    def _value(self, statistic: str, rows: tuple[str, ...], seed: int, images: np.ndarray | None) -> float | None:
        """The statistic of ``rows`` for training seed ``seed``, on ``images`` (indices) or all of them."""
        runs = [self.runs[row][seed] for row in rows]
        if statistic == "layout":
            first, second = (run.features if images is None else run.features[images] for run in runs)
            return float(twin_distances(first, second).mean())
        (run,) = runs
        if statistic == "alignment" and run.alignment is not None:  # per image, so it resamples; the row's value is their mean
            return float(run.alignment.mean() if images is None else run.alignment[images].mean())
        if images is None:
            return run.metrics.get(statistic)
        if statistic == "fid":
            if id(run) not in self._fid_of:
                self._fid_of[id(run)] = self.fid.resampler(run.features)
            return self._fid_of[id(run)](images)
        return None  # precision and recall: no bootstrap (see intervals.py)

    def find(self, difference: Difference) -> Finding:
        a, b = difference.a, difference.b
        seeds = min(len(self.runs[row]) for row in difference.rows)

        def at(seed: int, images: np.ndarray | None = None) -> float | None:
            first, second = self._value(difference.statistic, a, seed, images), self._value(difference.statistic, b, seed, images)
            return None if first is None or second is None else first - second

        estimate = at(0)
        if estimate is None:
            return Finding(difference, None, None, None, f"no {difference.statistic} for these rows", UNRESOLVED)
        if seeds >= 2:
            estimate, low, high = over_seeds([at(seed) for seed in range(seeds)])
            source = f"seeds ({seeds})"
        else:
            sizes = {len(self.runs[row][0].features) for row in difference.rows}
            bootable = len(sizes) == 1 and self.resamples and at(0, np.arange(min(sizes))) is not None
            if not bootable:
                return Finding(difference, estimate, None, None, "one seed, and no image-level interval for this statistic", UNRESOLVED)
            low, high = bootstrap(lambda images: at(0, images), sizes.pop(), self.resamples)
            source = "images (bootstrap)"
        return Finding(difference, estimate, low, high, source, verdict(difference.claimed, low, high, self.margins.get(difference.statistic, 0.0)))


def verdict(claimed: str, low: float, high: float, margin: float) -> str:
    """Of one difference, from its interval [low, high]."""
    if claimed == "=":
        if -margin < low and high < margin:
            return SUPPORTED
        return CONTRADICTED if low > margin or high < -margin else UNRESOLVED
    if claimed == ">=":
        return SUPPORTED if low > -margin else CONTRADICTED if high < -margin else UNRESOLVED
    below = {"<": high < 0, ">": low > 0}[claimed]
    above = {"<": low > 0, ">": high < 0}[claimed]
    return SUPPORTED if below else CONTRADICTED if above else UNRESOLVED


def combine(verdicts: list[str]) -> str:
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if verdicts and all(v == SUPPORTED for v in verdicts) else UNRESOLVED


def judge(evidence: Evidence, claims=CLAIMS) -> list[tuple[Claim, str, list[Finding]]]:
    """Each claim with its verdict and the findings behind it, in the paper's order."""
    judged = []
    for claim in claims:
        if not all(row in evidence.runs for difference in claim.differences for row in difference.rows):
            judged.append((claim, NOT_EVALUATED, []))
            continue
        findings = [evidence.find(difference) for difference in claim.differences]
        judged.append((claim, combine([finding.verdict for finding in findings]), findings))
    return judged

