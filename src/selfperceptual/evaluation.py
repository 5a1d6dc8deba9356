"""FID and Inception Score over the features of an evaluation network.

At the small scales the network is ``TinyFeatureNet``, a classifier trained on held-out real
corpus images (labels: shape x colour); its penultimate layer stands where Inception-v3's pool3
stands, its logits where Inception's do. At the paper scale it is Inception-v3 as torch-fidelity
ships it (imported lazily: torchvision-based packages do not import in the CPU environment).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .data.shards import to_tensor
from .device import Runtime, runtime


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


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config, seed: int) -> tuple[TinyFeatureNet, float]:
    """Cross-entropy training with flips and small shifts, in fp32 on the stage's device;
    returns (network on the CPU, last train accuracy)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = runtime("fp32").device
    network = TinyFeatureNet(num_classes, config.feature_dim).to(device)
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    accuracy = 0.0
    for _ in tqdm(range(config.train_steps), desc="featnet", mininterval=5):
        index = torch.randint(0, len(images), (config.batch,), generator=generator).to(device)
        batch = images[index]
        if torch.rand(1, generator=generator).item() < 0.5:
            batch = batch.flip(-1)
        shift = [int(v) for v in torch.randint(-3, 4, (2,), generator=generator)]
        batch = batch.roll(shifts=shift, dims=(-2, -1))
        _, logits = network(batch)
        loss = nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = 0.9 * accuracy + 0.1 * (logits.argmax(1) == labels[index]).float().mean().item()
    return network.cpu().eval(), accuracy


class InceptionExtractor(nn.Module):
    """Inception-v3 pool3 features and logits, as torch-fidelity computes them (paper scale)."""

    def __init__(self):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # ImportError, or torchvision's operator error on CPU-only torch
            raise SystemExit(
                "featnet.kind 'inception' needs torch-fidelity with a working torchvision "
                f"(pip install torch-fidelity on a CUDA machine): {error}"
            ) from error
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"]).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features, logits = self.network(uint8)
        return features, logits


def load_extractor(folder: Path, device: Runtime):
    """The evaluation network a featnet stage's folder describes, on ``device``."""
    kind = json.loads((folder / "extractor.json").read_text())["kind"]
    return device.place(TinyFeatureNet.load(folder) if kind == "tiny" else InceptionExtractor())


@torch.no_grad()
def extract(extractor, images, batch: int, device: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of a list of PIL images, computed on ``device``, returned as float64 on the CPU."""
    features, logits = [], []
    for start in range(0, len(images), batch):
        batch_features, batch_logits = extractor(device.tensor(to_tensor(images[start : start + batch])))
        features.append(batch_features.cpu().double())
        logits.append(batch_logits.cpu().double())
    return torch.cat(features), torch.cat(logits)


def gaussian_stats(features: torch.Tensor) -> dict[str, torch.Tensor]:
    array = features.numpy()
    return {"mu": torch.from_numpy(array.mean(0)), "sigma": torch.from_numpy(np.cov(array, rowvar=False))}


def frechet_distance(a: dict, b: dict) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as in Heusel et al. and clean-fid."""
    mu_a, mu_b = a["mu"].numpy(), b["mu"].numpy()
    sigma_a, sigma_b = a["sigma"].numpy(), b["sigma"].numpy()
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as clean-fid does
        offset = np.eye(len(sigma_a)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` disjoint parts (Salimans et al.)."""
    probs = torch.softmax(logits.double(), dim=1)
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part + 1e-12) - torch.log(marginal + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores)), float(np.std(scores))
