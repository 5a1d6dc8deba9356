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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .intervals import Resampled, over_seeds, resample_mean

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


@dataclass(frozen=True)
class RowRun:
    """One sampling row of one training seed: its metrics.json, and what evaluate kept in its
    features.safetensors (``saved``, read as it is asked for: ``features`` per image, and where
    evaluate made them ``alignment`` per image, ``fid_resamples`` and ``fid_all``)."""

    metrics: dict
    saved: Mapping[str, np.ndarray]

    @property
    def features(self) -> np.ndarray:
        return self.saved["features"]

    @property
    def alignment(self) -> np.ndarray | None:  # per image: recognised (0/1), or its CLIP score
        return self.saved["alignment"] if "alignment" in self.saved else None

    @property
    def fid(self) -> Resampled | None:
        """FID on all the images and on each bootstrap draw, as evaluate took them (on its device)."""
        if "fid_resamples" not in self.saved:
            return None
        return Resampled(int(self.metrics["num_images"]), float(self.saved["fid_all"][0]), np.asarray(self.saved["fid_resamples"], dtype=np.float64))


@dataclass(frozen=True)
class Finding:
    difference: Difference
    estimate: float | None
    low: float | None
    high: float | None
    source: str  # "seeds (n)" | "images (bootstrap)" | why there is no interval
    verdict: str


def twin_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The feature distance of each sample of one row to its twin in another: the sample of the
    same index, drawn from the same seed and caption (``sample`` seeds image i with seed + i)."""
    n = min(len(first), len(second))
    return np.linalg.norm(np.asarray(first[:n], dtype=np.float64) - np.asarray(second[:n], dtype=np.float64), axis=1)


class Evidence:
    """Every row's runs (one per training seed), with the intervals of the differences the claims
    name. ``resamples``: the bootstrap's draws for the per-image statistics (FID's were drawn by
    evaluate, the same way)."""

    def __init__(self, runs: dict[str, list[RowRun]], resamples: int, margins: dict[str, float]):
        self.runs, self.resamples, self.margins = runs, resamples, margins  # statistic -> margin of its "=" and ">="

    def _value(self, statistic: str, rows: tuple[str, ...], seed: int) -> float | None:
        """The statistic of ``rows`` for training seed ``seed``, on all their images."""
        runs = [self.runs[row][seed] for row in rows]
        if statistic == "layout":
            return float(twin_distances(runs[0].features, runs[1].features).mean())
        (run,) = runs
        if statistic == "alignment" and run.alignment is not None:
            return float(np.mean(run.alignment, dtype=np.float64))
        return run.metrics.get(statistic)

    def _resampled(self, statistic: str, rows: tuple[str, ...]) -> Resampled | None:
        """The statistic of ``rows`` (training seed 0) on all their images and on each bootstrap draw;
        None for a statistic without one (precision and recall: see intervals.py)."""
        runs = [self.runs[row][0] for row in rows]
        if statistic == "layout":
            return resample_mean(twin_distances(runs[0].features, runs[1].features), self.resamples)
        (run,) = runs
        if statistic == "alignment" and run.alignment is not None:
            return resample_mean(run.alignment, self.resamples)
        return run.fid if statistic == "fid" else None

    def find(self, difference: Difference) -> Finding:
        a, b = difference.a, difference.b
        seeds = min(len(self.runs[row]) for row in difference.rows)

        def at(seed: int) -> float | None:
            first, second = self._value(difference.statistic, a, seed), self._value(difference.statistic, b, seed)
            return None if first is None or second is None else first - second

        estimate = at(0)
        if estimate is None:
            return Finding(difference, None, None, None, f"no {difference.statistic} for these rows", UNRESOLVED)
        if seeds >= 2:
            estimate, low, high = over_seeds([at(seed) for seed in range(seeds)])
            source = f"seeds ({seeds})"
        else:
            sides = (self._resampled(difference.statistic, a), self._resampled(difference.statistic, b)) if self.resamples else (None,)
            if None in sides:
                return Finding(difference, estimate, None, None, "one seed, and no image-level interval for this statistic", UNRESOLVED)
            if len({int(self.runs[row][0].metrics["num_images"]) for row in difference.rows}) > 1:
                return Finding(difference, estimate, None, None, "one seed, and rows of different sizes (no paired bootstrap)", UNRESOLVED)
            low, high = (sides[0] - sides[1]).interval()
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

