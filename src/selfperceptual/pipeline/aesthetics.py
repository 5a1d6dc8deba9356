"""The aesthetic score of LAION-Aesthetics: the improved-aesthetic-predictor's MLP over L2-normalised
CLIP image embeddings (at the paper scale: CLIP ViT-L/14, 768 wide, with the weights file
``sac+logos+ava1-l14-linearMSE.pth``). At the small scales the same architecture, narrower, is
trained on the tiny CLIP's embeddings of corpus images and their ``AESTHETIC_SCORE``s.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

LAION_HIDDEN = (1024, 128, 64, 16)
DROPOUTS = (0.2, 0.2, 0.1)  # after the first three linear layers, as the predictor has them


class AestheticPredictor(nn.Module):
    """Linear layers input -> hidden... -> 1 with no activations, dropout after the first three:
    the predictor's module list, so its state dict (``layers.0.weight``, ...) loads unchanged."""

    def __init__(self, input_dim: int = 768, hidden: tuple[int, ...] = LAION_HIDDEN):
        super().__init__()
        self.config = {"input_dim": input_dim, "hidden": list(hidden)}
        layers = []
        for i, (width_in, width_out) in enumerate(itertools.pairwise((input_dim, *hidden))):
            layers.append(nn.Linear(width_in, width_out))
            if i < len(DROPOUTS):
                layers.append(nn.Dropout(DROPOUTS[i]))
        layers.append(nn.Linear(hidden[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores of CLIP image embeddings (normalised here), one per row."""
        return self.layers(nn.functional.normalize(embeddings.float(), dim=-1)).squeeze(-1)

    @classmethod
    def load(cls, path: str | Path, hidden: tuple[int, ...] = LAION_HIDDEN, sha256: str | None = None,
             setting: str = "aesthetic.weights") -> AestheticPredictor:  # fmt: skip
        """The predictor's weights file (a state dict, torch.save; the LAION predictor's
        sac+logos+ava1-l14-linearMSE.pth), read without running code, its input width read from it."""
        from ..method.weights import read_weights

        state = read_weights(path, setting, sha256)
        predictor = cls(state["layers.0.weight"].shape[1], hidden)
        predictor.load_state_dict(state)
        return predictor.eval()


def train_predictor(embeddings: np.ndarray, scores: np.ndarray, hidden: tuple[int, ...], steps: int, batch: int,
                    learning_rate: float, seed: int) -> tuple[AestheticPredictor, float]:  # fmt: skip
    """MSE regression of ``scores`` on the normalised ``embeddings`` (how the LAION predictor was
    trained); returns the predictor and its mean absolute error on the training rows."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), torch.from_numpy(np.asarray(scores, dtype=np.float32))
    predictor = AestheticPredictor(x.shape[1], hidden).train()
    with torch.no_grad():
        predictor.layers[-1].bias.fill_(float(y.mean()))  # start at the mean score: the fit learns the differences
    optimizer = torch.optim.Adam(predictor.parameters(), lr=learning_rate)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = nn.functional.mse_loss(predictor(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    predictor.eval()
    with torch.no_grad():
        error = (predictor(x) - y).abs().mean().item()
    return predictor, error
