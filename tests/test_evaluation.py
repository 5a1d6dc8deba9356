"""FID and Inception Score: identities, and a feature network that learns the corpus labels."""

import pytest
import torch

from selfperceptual.evaluation import TinyFeatureNet, frechet_distance, gaussian_stats, inception_score


def test_fid_is_zero_for_identical_statistics_and_grows_with_shift():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = gaussian_stats(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)
    near = frechet_distance(stats, gaussian_stats(features + 0.1))
    far = frechet_distance(stats, gaussian_stats(features + 1.0))
    assert near == pytest.approx(8 * 0.1**2, rel=1e-3)
    assert far == pytest.approx(8.0, rel=1e-3) and far > near


def test_fid_matches_closed_form_for_scaled_covariance():
    features = torch.randn(4000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = gaussian_stats(features), gaussian_stats(2 * features)
    # Tr(S + 4S - 2 * 2S) = Tr(S) for S_b = 4 S_a
    assert frechet_distance(a, b) == pytest.approx(a["sigma"].trace().item() + (a["mu"] - b["mu"]).pow(2).sum().item(), rel=1e-6)


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(10, 1) * 50  # every class equally often, each sure
    assert inception_score(confident, 1)[0] == pytest.approx(10.0, rel=1e-3)
    collapsed = torch.zeros(100, 10)
    collapsed[:, 3] = 50
    assert inception_score(collapsed, 1)[0] == pytest.approx(1.0, rel=1e-3)


def test_feature_network_learns_corpus_labels(tmp_path, smoke_config):
    import numpy as np
    from PIL import Image

    from selfperceptual.data.corpus import NUM_CLASSES, make_heldout_split
    from selfperceptual.data.shards import to_tensor
    from selfperceptual.evaluation import train_feature_net

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
