"""The tiny evaluation network of the small scales: a classifier of held-out real corpus images
(labels: shape x colour) whose penultimate layer stands where Inception-v3's pool3 stands. The
evaluation computes FID over its features; Cas-DM's metric at those scales is LPIPS over them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class TinyFeatureNet(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.config = {"num_classes": num_classes, "feature_dim": feature_dim}
        channels = (3, 32, 64, 128)
        layers = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [-1, 1] -> (features, logits)."""
        features = self.body(images)
        return features, self.head(features)

    def save(self, folder: Path) -> None:
        save_file(self.state_dict(), folder / "featnet.safetensors")
        (folder / "featnet.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, folder: Path) -> TinyFeatureNet:
        network = cls(**json.loads((folder / "featnet.json").read_text()))
        network.load_state_dict(load_file(folder / "featnet.safetensors"))
        return network.eval()
