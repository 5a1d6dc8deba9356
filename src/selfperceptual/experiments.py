"""The paper's experiments as data: which models are trained and which sampling rows are evaluated.

Variants are entries of these registries, never copies of code: a training run is one objective
and one conditioning of the one training stage; a sampling row is one sampler setting of the one
sampling stage. The DAG (``dag.py``) and the report (``stages/report.py``) both read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainRun:
    name: str  # the stage name and output folder
    objective: str  # mse | sp
    conditioning: str  # text | uncond
    init: str  # stage whose pipeline is the starting point
    perceptual: str | None = None  # freeze stage that provides f*_l (SP only)


@dataclass(frozen=True)
class SampleRow:
    name: str
    model: str  # training stage whose pipeline samples
    steps: int
    cfg: float | None = None  # None: guidance off
    rescale: float | None = None
    table: str = "table1"

    @property
    def conditioning(self) -> str:
        return TRAIN_RUNS[self.model].conditioning

    @property
    def objective(self) -> str:
        return TRAIN_RUNS[self.model].objective

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg is not None and self.cfg > 1 else 1)


TRAIN_RUNS = {
    run.name: run
    for run in (
        TrainRun("train_mse", "mse", "text", init="base"),
        TrainRun("train_sp", "sp", "text", init="train_mse", perceptual="freeze"),
        TrainRun("train_mse_uncond", "mse", "uncond", init="base"),
        TrainRun("train_sp_uncond", "sp", "uncond", init="train_mse_uncond", perceptual="freeze_uncond"),
    )
}

# freeze stage -> the MSE training stage it copies.
FREEZES = {"freeze": "train_mse", "freeze_uncond": "train_mse_uncond"}

SAMPLE_ROWS = {
    row.name: row
    for row in (
        # Table 1
        SampleRow("mse_s25", "train_mse", 25),
        SampleRow("mse_s50", "train_mse", 50),
        SampleRow("mse_cfg75_s25", "train_mse", 25, cfg=7.5),
        SampleRow("mse_cfg75_r07_s25", "train_mse", 25, cfg=7.5, rescale=0.7),
        SampleRow("sp_s25", "train_sp", 25),
        SampleRow("sp_s50", "train_sp", 50),
        # Table 8 (always the empty prompt)
        SampleRow("uncond_mse_s25", "train_mse_uncond", 25, table="table8"),
        SampleRow("uncond_sp_s25", "train_sp_uncond", 25, table="table8"),
    )
}

# Same-seed grids of the report (Fig. 3/4 and Fig. 5): columns, left to right.
GRIDS = {
    "text": ("mse_s25", "sp_s25", "mse_cfg75_r07_s25"),
    "uncond": ("uncond_mse_s25", "uncond_sp_s25"),
}
