"""FID, IS and precision/recall through torch-fidelity; the reference set; the Inception-v3 path
with a local weights file; a feature network that learns the corpus labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfperceptual.method.device import runtime
from selfperceptual.method.errors import MissingComponent
from selfperceptual.method.featnet import TinyFeatureNet
from selfperceptual.method.weights import WeightsFileError, read_weights
from selfperceptual.pipeline.evaluation import (
    InceptionExtractor,
    extract,
    inception_score,
    load_extractor,
    metrics,
    reference_images,
    save_extractor,
    save_reference,
)


def _reference(features, tmp_path):
    from safetensors.torch import load_file

    save_reference(features, tmp_path / "reference.safetensors")
    return load_file(tmp_path / "reference.safetensors")


def test_metrics_of_identical_features_and_of_shifted_ones(tmp_path):
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = torch.randn(500, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = _reference(features, tmp_path)
    same = metrics(features, logits, reference, is_splits=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-5)
    assert same["precision"] == same["recall"] == 1.0
    near, far = metrics(features + 0.1, logits, reference, 2), metrics(features + 1.0, logits, reference, 2)
    assert near["fid"] == pytest.approx(8 * 0.1**2, rel=1e-3)
    assert far["fid"] == pytest.approx(8.0, rel=1e-3)
    assert far["precision"] < near["precision"] and far["recall"] < near["recall"]


def test_fid_matches_closed_form_for_scaled_covariance(tmp_path):
    features = torch.randn(4000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = _reference(features, tmp_path)
    # Tr(S + 4S - 2 * 2S) = Tr(S) for S_b = 4 S_a
    expected = reference["sigma"].trace().item() + (features.mean(0) - 2 * features.mean(0)).pow(2).sum().item()
    assert metrics(2 * features, torch.zeros(4000, 3), reference, 1)["fid"] == pytest.approx(expected, rel=1e-6)


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(10, 1) * 50  # every class equally often, each sure
    assert inception_score(confident, 1)[0] == pytest.approx(10.0, rel=1e-3)
    collapsed = torch.zeros(100, 10)
    collapsed[:, 3] = 50
    assert inception_score(collapsed, 1)[0] == pytest.approx(1.0, rel=1e-3)


def test_reference_images_are_distinct_and_centre_cropped_not_squashed(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # red bars at the sides of a wide image: a centre crop removes them
    pixels[:, 60:] = (255, 0, 0)
    pixels[:, 20:60] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.fromarray(np.full((30, 30, 3), 128, np.uint8)).save(tmp_path / "square.png")
    paths = [str(tmp_path / "wide.png"), str(tmp_path / "square.png"), str(tmp_path / "wide.png")]
    images = reference_images(paths, 16)
    assert len(images) == 2 and all(image.size == (16, 16) for image in images)
    corners = np.asarray(images[0])[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners[:, 2] > 200).all() and (corners[:, 0] < 50).all()  # blue to the edges: no squashed red


@pytest.fixture
def inception_weights(rehearsal_inputs):
    from selfperceptual.pipeline.rehearsal import INCEPTION_FILE

    return rehearsal_inputs / "inception" / INCEPTION_FILE


def test_inception_from_a_local_weights_file_gives_informative_features(inception_weights, tmp_path):
    from types import SimpleNamespace

    from selfperceptual.pipeline.data.corpus import random_scene, render

    rng = np.random.default_rng(3)
    images = [render(random_scene(rng), 48, 48, 7.0, rng) for _ in range(12)]
    save_extractor(tmp_path, SimpleNamespace(kind="inception", inception_weights=str(inception_weights), inception_sha256=None))
    device = runtime("fp32")
    features, logits = extract(load_extractor(tmp_path, device), images, 5, device)
    assert features.shape == (12, 2048) and logits.shape == (12, 1008)
    assert features.std(0).mean() > 0.05 * features.abs().mean()  # images differ in feature space
    assert inception_score(logits, 1)[0] > 1.5
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # torch-fidelity loading the file itself

    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights))
    batch = torch.from_numpy(np.stack([np.asarray(image) for image in images[:5]])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        assert torch.equal(theirs(batch)[0], InceptionExtractor(read_weights(inception_weights, "w")).network(batch)[0])


def test_missing_inception_weights_name_the_path_and_the_url(tmp_path):
    from types import SimpleNamespace

    with pytest.raises(WeightsFileError, match=r"^featnet\.inception_weights: .*nowhere\.pth: not a file\. .*https://github\.com/toshas/torch-fidelity/releases/.*weights-inception-2015-12-05-6726825d\.pth"):
        save_extractor(tmp_path, SimpleNamespace(kind="inception", inception_weights=str(tmp_path / "nowhere.pth"), inception_sha256=None))


def test_feature_network_learns_corpus_labels(tmp_path, smoke_config):
    from selfperceptual.pipeline.data.corpus import NUM_CLASSES, make_heldout_split
    from selfperceptual.pipeline.data.shards import to_tensor
    from selfperceptual.pipeline.evaluation import train_feature_net

    folder = tmp_path / "featnet"
    folder.mkdir()
    rows = make_heldout_split(480, 32, folder, np.random.default_rng(0))
    images = to_tensor([Image.open(tmp_path / path) for path in rows.image])
    labels = torch.tensor(rows.label.to_numpy())
    settings = smoke_config.featnet.model_copy(update={"train_steps": 150})
    network, accuracy = train_feature_net(images, labels, NUM_CLASSES, settings, seed=0)
    assert accuracy > 3 / NUM_CLASSES  # well above chance
    network.save(tmp_path)
    reloaded = TinyFeatureNet.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(images[:4])[1], network(images[:4])[1])


def test_alignment_counts_samples_the_classifier_labels_as_their_caption(tmp_path):
    import pandas as pd

    from selfperceptual.pipeline.stages.evaluate import caption_labels, recognised

    pd.DataFrame({"caption": ["a red circle", "a blue square", "a red circle"], "label": [3, 7, 3], "image": ["a", "b", "c"]}).to_parquet(tmp_path / "eval.parquet")
    labels = caption_labels(tmp_path)
    assert labels == {"a red circle": 3, "a blue square": 7}
    logits = torch.zeros(3, 10)
    logits[0, 3] = logits[1, 2] = logits[2, 3] = 1.0  # the second sample looks like class 2, not its caption's 7
    assert recognised(logits, ["a red circle", "a blue square", "a red circle"], labels).tolist() == [1.0, 0.0, 1.0]
    assert recognised(logits, ["", "", ""], labels) is None  # unconditional rows have no alignment
    with pytest.raises(SystemExit, match="1 prompts are not eval captions of the corpus, e.g. 'a green star'"):
        recognised(logits, ["a red circle", "a green star", "a red circle"], labels)
    pd.DataFrame({"caption": ["a photo"], "label": [-1], "image": ["a"]}).to_parquet(tmp_path / "eval.parquet")
    assert caption_labels(tmp_path) == {}  # COCO captions: no labels, no alignment


def test_clip_score_is_the_cosine_of_each_image_with_its_own_caption(tmp_path):
    """At the paper scale text alignment is CLIP score, from a CLIP model in a local folder (here
    openai/clip-vit-large-patch14's layout with a tiny random model, as the rehearsal writes it)."""
    from transformers import CLIPModel, CLIPProcessor

    from selfperceptual.pipeline.evaluation import clip_scores
    from selfperceptual.pipeline.rehearsal import write_clip

    captions = ["a red circle on grass", "two blue squares", "a photo of a cat on a sofa", "a green star", "blue"]
    write_clip(tmp_path / "clip", seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(5)]
    scores = clip_scores(str(tmp_path / "clip"), images, captions, batch=2, device=runtime("fp32"))

    # The whole batch at once through transformers' own image-text logits: the diagonal pairs each
    # image with its caption; the logits are the cosines times exp(logit_scale).
    model, processor = CLIPModel.from_pretrained(tmp_path / "clip").eval(), CLIPProcessor.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        out = model(**processor(text=captions, images=images, return_tensors="pt", padding=True))
    expected = 100 * out.logits_per_image.diag().double() / model.logit_scale.exp().double()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    swapped = clip_scores(str(tmp_path / "clip"), images, [captions[1], captions[0], *captions[2:]], batch=5, device=runtime("fp32"))
    torch.testing.assert_close(swapped[2:], scores[2:], rtol=1e-4, atol=1e-4)  # batching changes nothing
    assert not torch.allclose(swapped[:2], scores[:2])  # each image is scored with its own caption
    with pytest.raises(MissingComponent, match="evaluate.clip .* is not a CLIP model folder"):
        clip_scores(str(tmp_path / "nothing"), images, captions, batch=2, device=runtime("fp32"))
