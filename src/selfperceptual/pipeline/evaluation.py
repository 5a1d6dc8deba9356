"""FID, Inception Score and precision/recall, computed by torch-fidelity over an evaluation network's features.

The metrics' arithmetic is torch-fidelity's (``fid_statistics_to_metric``, ``isc_features_to_metric``,
``prc_features_to_metric``) at every scale; only the feature network changes. At the paper scale
it is Inception-v3 as torch-fidelity defines it (``inception-v3-compat``: TF1-compatible bilinear
resize to 299 inside the network; pool3 features, unbiased logits), with weights read from the
local file ``featnet.inception_weights`` names. At the small scales it is ``TinyFeatureNet``, a
classifier trained on held-out real corpus images (labels: shape x colour): its penultimate layer
stands where Inception's pool3 stands, its logits where Inception's do.

The reference set (``reference_images``): the distinct real images of the eval captions, each
once, centre-cropped to a square and resized to the generated images' resolution with PIL's
bicubic filter (never squashed), so real and generated images reach the network alike.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from tqdm import tqdm

from ..method.errors import InputError, MissingComponent
from ..method.weights import WeightsFileError, read_weights
from ..method.featnet import TinyFeatureNet
from .data.shards import to_tensor
from .io import decode_images
from ..method.device import Runtime, runtime
from .intervals import Resampled, resample

INCEPTION_FILE = "inception-v3.safetensors"  # the featnet folder's copy of featnet.inception_weights, converted


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


class _Unloaded(FeatureExtractorInceptionV3):
    def load_state_dict(self, state_dict, strict=True, assign=False):  # what its __init__ reads is ignored
        return None


def inception_v3(features_list: list[str], state: dict[str, torch.Tensor] | None = None) -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3 (``inception-v3-compat``) with ``state`` as its weights (None:
    as initialised). torch-fidelity reads a weights file with ``torch.load(..., weights_only=False)``,
    which runs whatever code a pickle carries: it is handed an empty file of our own instead, and the
    weights, read without running code (``method.weights``), are loaded after."""
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        network = _Unloaded("inception-v3-compat", features_list, feature_extractor_weights_path=str(empty))
    if state is not None:
        nn.Module.load_state_dict(network, state)
    return network


class InceptionExtractor(nn.Module):
    """Inception-v3 pool3 features and unbiased logits, as torch-fidelity computes them (paper scale)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.network = inception_v3(["2048", "logits_unbiased"], state)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uint8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features, logits = self.network(uint8)
        return features, logits


def read_inception_weights(path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the Inception-v3 weights file ``featnet.inception_weights`` names, read
    without running code, checked against ``sha256`` (its published hash) and against the network."""
    setting = "featnet.inception_weights"
    if not path or not Path(path).is_file():
        raise WeightsFileError(setting, path, f"not a file. Download torch-fidelity's Inception-v3 weights "
                                              f"({Path(URL_INCEPTION_V3).name}) from {URL_INCEPTION_V3} and name the file in params.yaml")  # fmt: skip
    state = read_weights(path, setting, sha256)
    try:
        inception_v3(["2048"], state)
    except RuntimeError as error:
        first = " ".join(str(error).split())[:300]
        raise WeightsFileError(setting, path, f"not Inception-v3's weights as torch-fidelity names them ({first})") from None
    return state


def save_extractor(out: Path, settings) -> None:
    """Records which network the featnet folder holds (the tiny one saves itself); Inception's
    weights are converted once to safetensors in it, so the folder is the whole evaluation network
    and no evaluate job unpickles anything."""
    if settings.kind == "inception":
        save_file(read_inception_weights(settings.inception_weights, settings.inception_sha256), out / INCEPTION_FILE)
    (out / "extractor.json").write_text(json.dumps({"kind": settings.kind}))


def check_featnet(folder: Path) -> None:
    """A featnet stage's folder holds its network and the reference set's features; names what is not there."""
    kinds = {"tiny": ("featnet.json", "featnet.safetensors"), "inception": (INCEPTION_FILE,)}
    if not (folder / "extractor.json").is_file():
        raise InputError("featnet", "no extractor.json; is this a featnet stage's folder? (run its featnet stage)", folder)
    kind = json.loads((folder / "extractor.json").read_text())["kind"]
    missing = [name for name in (*kinds[kind], "reference.safetensors") if not (folder / name).is_file()]
    if missing:
        raise InputError("featnet", f"{', '.join(missing)} missing; rerun its featnet stage", folder)


def load_extractor(folder: Path, device: Runtime):
    """The evaluation network a featnet stage's folder holds, on ``device``."""
    kind = json.loads((folder / "extractor.json").read_text())["kind"]
    if kind == "tiny":
        return device.place(TinyFeatureNet.load(folder))
    if device.dtype != torch.float32:
        raise ValueError("evaluate.precision must be fp32 with Inception-v3 (torch-fidelity computes it in fp32)")
    return InceptionExtractor(load_file(folder / INCEPTION_FILE)).to(device.device).eval()


def reference_images(paths: list[str], resolution: int) -> list[Image.Image]:
    """The distinct images of ``paths`` (first occurrence order), centre-cropped and resized to
    ``resolution`` x ``resolution`` with PIL's bicubic filter."""
    return decode_images(dict.fromkeys(paths), lambda image: ImageOps.fit(image, (resolution, resolution), Image.BICUBIC))


@torch.no_grad()
def extract(extractor, images, batch: int, device: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of a list of PIL images, computed on ``device``, returned as float64 on the CPU."""
    features, logits = [], []
    for start in tqdm(range(0, len(images), batch), desc="features", mininterval=10):
        batch_features, batch_logits = extractor(device.tensor(to_tensor(images[start : start + batch])))
        features.append(batch_features.cpu().double())
        logits.append(batch_logits.cpu().double())
    return torch.cat(features), torch.cat(logits)


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

    def resampled(self, features: torch.Tensor, resamples: int) -> Resampled:
        """FID on all the images and on each bootstrap draw of them (``intervals.draws``), as
        evaluate keeps it for the report's paired differences."""
        return resample(self.resampler(features), len(features), resamples)


def sigma_root(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix (its negative rounding-error eigenvalues as 0)."""
    values, vectors = torch.linalg.eigh(sigma.double())
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def save_reference(features: torch.Tensor, path: Path) -> None:
    """The real images' features (for precision/recall), their Gaussian statistics (for FID) and
    the covariance's square root (for the bootstrap's FID, taken here once for every evaluation)."""
    stats = fid_features_to_statistics(features)
    sigma = torch.from_numpy(stats["sigma"])
    save_file(
        {"features": features.float().contiguous(), "mu": torch.from_numpy(stats["mu"]), "sigma": sigma, "sigma_root": sigma_root(sigma)},
        path,
    )


def metrics(features: torch.Tensor, logits: torch.Tensor, reference: dict[str, torch.Tensor], is_splits: int) -> dict[str, float]:
    """FID against the reference statistics, IS (torch-fidelity's defaults: shuffled with seed
    2020, ``is_splits`` parts), and precision/recall with k = 3 against the reference features."""
    real = {"mu": reference["mu"].numpy(), "sigma": reference["sigma"].numpy()}
    fid = fid_statistics_to_metric(fid_features_to_statistics(features.double()), real, verbose=False)
    score, score_std = inception_score(logits, is_splits)
    prc = prc_features_to_metric(features.float(), reference["features"].float(), verbose=False)
    return {
        "fid": fid[KEY_METRIC_FID],
        "is": score,
        "is_std": score_std,
        "precision": prc[KEY_METRIC_PRECISION],
        "recall": prc[KEY_METRIC_RECALL],
    }


def inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    score = isc_features_to_metric(logits.double(), splits=splits)
    return score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]


def clip_scores(model: str, images: list[Image.Image], prompts: list[str], batch: int, device: Runtime) -> torch.Tensor:
    """Per image, 100 times the cosine of its CLIP image embedding and its caption's text embedding
    (CLIP score, Hessel et al. 2021, w = 100), with the CLIP model at ``model`` (a local folder, or
    a hub id in the local Hugging Face cache); captions past CLIP's 77 tokens are cut. The row's
    score is their mean. torchmetrics' ``CLIPScore`` floors that mean at 0; we do not, so the table
    and the claims' intervals use the same numbers (only a meaningless CLIP model scores below 0).
    Its 1.9.0 cannot be used here, as it reads ``get_image_features`` as a tensor, which
    transformers 5 no longer returns."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        network, processor = device.place(CLIPModel.from_pretrained(model)), CLIPProcessor.from_pretrained(model)
    except OSError as error:
        raise MissingComponent(f"evaluate.clip {model!r} is not a CLIP model folder or a cached hub id ({error})") from error
    scores = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc="clip score", mininterval=10):
            inputs = processor(text=prompts[start : start + batch], images=images[start : start + batch], return_tensors="pt",
                               padding=True, truncation=True)  # fmt: skip
            out = network(input_ids=inputs["input_ids"].to(device.device), attention_mask=inputs["attention_mask"].to(device.device),
                          pixel_values=device.tensor(inputs["pixel_values"]))  # fmt: skip
            scores.append(100 * nn.functional.cosine_similarity(out.image_embeds.double(), out.text_embeds.double()).cpu())
    return torch.cat(scores)
