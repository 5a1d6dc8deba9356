"""The data stages' CLIP and aesthetic predictor: OpenAI's tokenizer as clip-retrieval uses it, a tiny
CLIP that learns the corpus, and the LAION predictor's architecture and weights format."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfperceptual.pipeline.aesthetics import AestheticPredictor, train_predictor
from selfperceptual.pipeline.tinyclip import CONTEXT_LENGTH, image_embeddings, openai_tokenizer, train_tiny_clip, write_tokenizer


def _clip_tokenize(simple, texts):
    """clip.tokenize (clip-anytorch, what clip-retrieval's hf_clip loader calls), written out."""
    start, end = simple.encoder["<|startoftext|>"], simple.encoder["<|endoftext|>"]
    ids = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [start, *simple.encode(text), end]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def test_the_tokenizer_files_give_clip_retrievals_ids(tmp_path):
    texts = ["a large red circle on a white background", "A photo of a confused grizzly bear in calculus class.",
             "New York Skyline with 'Deep Learning' written with fireworks on the sky."]  # fmt: skip
    ours = write_tokenizer(tmp_path)(texts, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
    theirs = _clip_tokenize(openai_tokenizer(), texts)
    assert len(write_tokenizer(tmp_path / "again")) == 49408
    for mine, reference in zip(ours, theirs, strict=True):
        used = int((reference != 0).sum())
        assert torch.equal(mine[:used], reference[:used])


def test_a_tiny_clip_learns_which_caption_goes_with_which_image(tmp_path):
    from types import SimpleNamespace

    from selfperceptual.pipeline.data.corpus import random_scene, render

    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(96)]
    images = [render(scene, 32, 32, 7.0, rng) for scene in scenes]
    settings = SimpleNamespace(width=32, layers=1, heads=2, patch=8, embed_dim=32, train_steps=80, batch=32, learning_rate=2e-3)
    metrics = train_tiny_clip(images, [scene.caption for scene in scenes], settings, 32, seed=0, out=tmp_path / "clip")
    assert metrics["retrieval_accuracy"] > 2 / 32  # in-batch retrieval well above chance (1/32)
    embedded = image_embeddings(tmp_path / "clip", images[:5], batch=2)
    assert embedded.shape == (5, 32) and torch.allclose(embedded, image_embeddings(tmp_path / "clip", images[:5], batch=5), atol=1e-5)


def test_the_aesthetic_predictor_has_laions_layers_and_loads_their_file(tmp_path):
    predictor = AestheticPredictor()
    linear = {name.split(".")[1] for name in predictor.state_dict() if name.endswith("weight")}
    assert linear == {"0", "2", "4", "6", "7"}  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
    assert [predictor.state_dict()[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)] == [768, 1024, 128, 64, 16]
    torch.save(predictor.state_dict(), tmp_path / "weights.pth")
    loaded = AestheticPredictor.load(tmp_path / "weights.pth")
    embeddings = torch.randn(4, 768)
    assert torch.equal(loaded(embeddings), predictor.eval()(embeddings))
    assert torch.allclose(loaded(3 * embeddings), loaded(embeddings))  # it scores the normalised embedding
    from selfperceptual.method.weights import WeightsFileError

    with pytest.raises(WeightsFileError, match=r"^aesthetic\.weights: .*missing\.pth: not a file"):
        AestheticPredictor.load(tmp_path / "missing.pth")


def test_a_small_predictor_fits_scores_that_depend_on_the_embedding():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(512, 16)).astype(np.float32)
    direction = rng.normal(size=16)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = 6 + 2 * unit @ direction / np.linalg.norm(direction)
    _, error = train_predictor(embeddings, scores, (16, 8, 8, 4), steps=600, batch=64, learning_rate=3e-3, seed=0)
    assert error < 0.5 * np.abs(scores - scores.mean()).mean()


@pytest.mark.slow
def test_clip_retrieval_embeds_every_download_with_our_clip_and_the_filter_is_measured_again(smoke_stages, tmp_path):
    """The smoke scale's data stages: the tiny CLIP, clip-retrieval in its own environment (made
    here if missing), the tiny predictor and the re-applied threshold."""
    from conftest import run_stage

    from selfperceptual.pipeline.data.shards import iter_samples
    from selfperceptual.pipeline.io import read_json
    from selfperceptual.pipeline.data.embeddings import read_embeddings

    runs = smoke_stages
    run_stage("clip", tmp_path / "clip", "--images", runs / "download")
    run_stage("clip_embed", tmp_path / "clip_embed", "--images", runs / "download", "--clip", tmp_path / "clip")
    images, texts, metadata = read_embeddings(tmp_path / "clip_embed")
    samples = list(iter_samples([runs / "download"]))
    assert len(images) == len(texts) == len(samples) and images.shape[1] == 32
    # clip-retrieval's embedding of a sample is our tiny CLIP's, normalised (stored as float16).
    position = {key: i for i, key in enumerate(metadata["key"])}
    _, image, caption = samples[3]
    ours = image_embeddings(tmp_path / "clip" / "model", [image], batch=1)[0]
    match = [i for i, text in enumerate(metadata["caption"]) if text == caption]
    assert match and any(np.allclose(images[i], (ours / ours.norm()).numpy(), atol=2e-3) for i in match)
    assert len(position) == len(samples)
    run_stage("aesthetic_train", tmp_path / "aesthetic_train", "--corpus", runs / "corpus", "--clip", tmp_path / "clip")
    run_stage("aesthetic", tmp_path / "aesthetic", "--embeddings", tmp_path / "clip_embed", "--predictor", tmp_path / "aesthetic_train")
    stats = read_json(tmp_path / "aesthetic" / "stats.json")
    assert stats["samples"] == len(samples) and stats["kept"] + stats["removed"] == len(samples)
    assert stats["corpus_mean"] > stats["threshold"]  # every download passed the filter on the corpus score


def test_the_clip_environment_links_venvs_torch_build_and_refuses_a_different_one(tmp_path):
    from selfperceptual.pipeline.clipenv import link_torch

    site = tmp_path / "env" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True)
    names = link_torch(tmp_path / "env")
    assert "torch" in names and any(name.startswith("torchvision-") for name in names)
    assert (site / "torch").resolve() == Path(torch.__file__).resolve().parent
    assert not (site / "numpy").exists()  # only the torch stack: clip-retrieval's numpy is its own
    assert link_torch(tmp_path / "env") == names  # a second run changes nothing
    (site / "torchvision").unlink()
    (site / "torchvision").mkdir()  # another torchvision installed there
    with pytest.raises(SystemExit, match="torchvision exists and is not .venv's"):
        link_torch(tmp_path / "env")
    with pytest.raises(SystemExit, match="same Python"):
        link_torch(tmp_path / "elsewhere")


def test_clip_embed_names_how_to_make_an_environment_it_is_pointed_at(tmp_path, monkeypatch):
    from selfperceptual.pipeline.stages.clip_embed import CLIP_ENV_VARIABLE, clip_retrieval

    monkeypatch.setenv(CLIP_ENV_VARIABLE, str(tmp_path / "env"))
    with pytest.raises(SystemExit, match=f"make clip-env CLIP_VENV={tmp_path / 'env'}"):
        clip_retrieval()
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / ".installed").touch()
    assert clip_retrieval() == tmp_path / "env" / "bin" / "clip-retrieval"
