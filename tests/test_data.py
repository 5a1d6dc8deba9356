"""The corpus, the filter, and a real img2dataset download of file:// URLs into webdataset shards."""

import pandas as pd
import pytest

from selfperceptual.pipeline.data.corpus import COLORS, LAION_COLUMNS, SHAPES, build_synthetic
from selfperceptual.pipeline.data.filtering import filter_rows
from selfperceptual.pipeline.data.shards import iter_samples
from selfperceptual.pipeline.io import write_json


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, smoke_config):
    out = tmp_path_factory.mktemp("corpus")
    summary = build_synthetic(smoke_config.corpus.model_copy(update={"num_train_rows": 120}), 32, out)
    write_json(out / "summary.json", summary)  # as the corpus stage does: the download reads its source
    return out, summary


def test_corpus_has_laion_schema_and_is_deterministic(corpus, smoke_config, tmp_path):
    out, summary = corpus
    rows = pd.read_parquet(out / "laion.parquet")
    assert list(rows.columns) == LAION_COLUMNS and len(rows) == summary["train_rows"] == 120
    again = tmp_path / "again"
    again.mkdir()
    build_synthetic(smoke_config.corpus.model_copy(update={"num_train_rows": 120}), 32, again)
    assert pd.read_parquet(again / "laion.parquet").equals(rows)
    assert (again / "images" / "000007.jpg").read_bytes() == (out / "images" / "000007.jpg").read_bytes()


def test_corpus_straddles_the_thresholds(corpus, smoke_config):
    rows = pd.read_parquet(corpus[0] / "laion.parquet")
    side = rows[["WIDTH", "HEIGHT"]].min(axis=1)
    assert (rows.AESTHETIC_SCORE > 6).any() and (rows.AESTHETIC_SCORE <= 6).any()
    assert (side > smoke_config.filter.min_side).any() and (side <= smoke_config.filter.min_side).any()


def test_captions_say_what_images_show(corpus):
    evaluation = pd.read_parquet(corpus[0] / "eval.parquet")
    for caption, label in zip(evaluation.caption, evaluation.label):
        shape, color = SHAPES[label // len(COLORS)], list(COLORS)[label % len(COLORS)]
        assert f"{color} {shape}" in caption
    assert (corpus[0] / evaluation.image[0]).is_file()


def test_filter_counts_each_condition(corpus, smoke_config):
    rows = pd.read_parquet(corpus[0] / "laion.parquet")
    kept, stats = filter_rows(rows, smoke_config.filter)
    assert stats["rows_in"] == len(rows) and stats["rows_kept"] == len(kept) > 0
    assert stats["removed_by"]["aesthetic"] == int((rows.AESTHETIC_SCORE <= 6).sum())
    assert stats["removed_by"]["min_side"] == int((rows[["WIDTH", "HEIGHT"]].min(axis=1) <= smoke_config.filter.min_side).sum())
    assert (kept.AESTHETIC_SCORE > 6).all()


def test_filter_can_remove_everything(corpus, smoke_config):
    kept, stats = filter_rows(pd.read_parquet(corpus[0] / "laion.parquet"), smoke_config.filter.model_copy(update={"min_aesthetic": 99.0}))
    assert kept.empty and stats["rows_kept"] == 0


def test_download_stage_fetches_with_img2dataset_and_counts_failures(corpus, repo, tmp_path):
    from selfperceptual.pipeline.cli import main

    out, _ = corpus
    assert main(["filter", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--corpus", str(out), "--out", str(tmp_path / "filter")]) == 0
    kept = pd.read_parquet(tmp_path / "filter" / "kept.parquet")
    kept.loc[0, "URL"] = "images/does-not-exist.jpg"  # a dead link must be counted, not fatal
    kept.to_parquet(tmp_path / "filter" / "kept.parquet", index=False)
    args = ["download", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--filtered", str(tmp_path / "filter"), "--corpus", str(out), "--out", str(tmp_path / "download")]
    assert main(args) == 0
    import json

    stats = json.loads((tmp_path / "download" / "stats.json").read_text())
    samples = list(iter_samples([tmp_path / "download"]))
    assert stats["count"] == len(kept)
    assert stats["successes"] == len(samples) and 0 < len(samples) < len(kept)
    assert stats["failed_to_download"] >= 1
    key, image, caption = samples[0]
    assert key == f"{1:09d}"  # its row in kept.parquet: row 0 is the dead link
    assert image.size == (32, 32) and caption.startswith("a ")
