"""MSE, the diffusion loss every other objective is compared with: Eq. 4, || v_hat - v ||^2 (losses.MSELoss)."""

from __future__ import annotations

from .base import Objective, register


@register
class MSE(Objective):
    name, label = "mse", "MSE"
    summary = "the diffusion loss, || v_hat - v ||^2 (Eq. 4)."

    def loss(self, settings, schedule, pipeline, inputs):
        from ..losses import MSELoss

        return MSELoss(schedule)
