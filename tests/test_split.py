"""Stages split into several jobs (download, encode, sample) give the same result as one job."""

import json

import pytest
import torch
from conftest import run_stage
from workspace import REPO

from selfperceptual.method.errors import InputError
from selfperceptual.pipeline.data.shards import iter_samples, sample_batches
from selfperceptual.pipeline.data.samples import sample_images
from selfperceptual.pipeline.split import batch_block, parse_part
from selfperceptual.pipeline.training import LatentData


def test_batch_blocks_cover_everything_once_on_batch_boundaries():
    for total, batch, count in [(10, 3, 2), (7, 4, 3), (100, 10, 4), (5, 8, 3)]:
        parts = [batch_block(total, batch, index, count) for index in range(count)]
        assert [i for part in parts for i in part] == list(range(total))
        assert all(part.start % batch == 0 or part.start == total for part in parts)
    with pytest.raises(Exception, match="I/N"):
        parse_part("3/3")


def test_sample_batches_decoded_ahead_are_the_samples_of_the_block_in_order(smoke_stages):
    """encode's reader: a block [start, stop) in batches, each decoded on threads while the caller
    works on the previous one, gives the same keys, pixels and captions as reading in line."""
    folders = [smoke_stages / "download"]
    whole = [(key, image.tobytes(), caption) for key, image, caption in iter_samples(folders)]
    start, stop = 3, len(whole) - 2
    batches = list(sample_batches(folders, 7, start, stop))
    assert [len(batch) for batch in batches[:-1]] == [7] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 7
    assert [(key, image.tobytes(), caption) for batch in batches for key, image, caption in batch] == whole[start:stop]
    assert [len(batch) for batch in sample_batches(folders, len(whole) + 5)] == [len(whole)]


def test_download_in_two_jobs_fetches_the_same_samples(smoke_stages, tmp_path):
    runs = smoke_stages
    for index in range(2):
        run_stage("download", tmp_path / f"download_part{index}", "--filtered", runs / "filter", "--corpus", runs / "corpus",
                  "--set", "download.num_jobs=2", "--part", f"{index}/2")
    one = [(key, image.tobytes(), caption) for key, image, caption in iter_samples([runs / "download"])]
    two = [(key, image.tobytes(), caption) for key, image, caption in iter_samples([tmp_path / "download_part0", tmp_path / "download_part1"])]
    assert len(one) > 50 and one == two
    rows = [json.loads((tmp_path / f"download_part{i}" / "stats.json").read_text())["rows"] for i in range(2)]
    assert rows[0][0] == 0 and rows[0][1] == rows[1][0]  # contiguous blocks of the kept rows


def test_encode_in_three_jobs_gives_the_same_latents(smoke_stages, tmp_path):
    runs = smoke_stages
    parts = [tmp_path / f"encode_part{index}" for index in range(3)]
    for index, folder in enumerate(parts):
        run_stage("encode", folder, "--images", runs / "download", "--base", runs / "base", "--set", "encode.num_jobs=3",
                  "--set", "encode.batch=16", "--part", f"{index}/3")
    whole = tmp_path / "encode_whole"
    run_stage("encode", whole, "--images", runs / "download", "--base", runs / "base", "--set", "encode.batch=16")
    one, three = LatentData([whole]), LatentData(parts)
    assert len(one) == len(three) > 50
    assert all(all(torch.equal(a, b) for a, b in zip(one._rows(i), three._rows(i))) for i in range(len(one)))
    assert one.captions(len(one)) == three.captions(len(three))
    shard_size = json.loads((whole / "params.json").read_text())["encode"]["shard_size"]
    assert len(one.files) == -(-len(one) // shard_size) and len(three.files) >= 3  # bounded shards, one part's at least each


def test_sampling_in_two_jobs_gives_the_same_images(smoke_stages, tmp_path):
    runs = smoke_stages
    common = ["--model", runs / "base", "--corpus", runs / "corpus", "--row", "mse_cfg75_r07_s25", "--set", "sample.num_images=10", "--set", "sample.batch=4"]
    run_stage("sample", tmp_path / "whole", *common)
    for index in range(2):
        run_stage("sample", tmp_path / f"part{index}", *common, "--set", "sample.num_jobs=2", "--part", f"{index}/2")
    _, whole = sample_images([tmp_path / "whole"])
    _, split = sample_images([tmp_path / "part0", tmp_path / "part1"])
    assert [p.name for p in whole] == [p.name for p in split] == [f"{i:05d}.png" for i in range(10)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(whole, split))
    assert len(list((tmp_path / "part0" / "images").glob("*.png"))) == 4  # part 0 of 3 batches of 4: one batch
    with pytest.raises(InputError, match="a part is missing") as refused:
        sample_images([tmp_path / "part1"])
    assert refused.value.input == "samples"


def test_a_job_of_another_split_is_refused(smoke_stages, tmp_path, capsys):
    from selfperceptual.pipeline.cli import main

    runs = smoke_stages
    code = main(["sample", "--params", str(REPO / "params.yaml"), "--scale", "smoke", "--out", str(tmp_path / "x"),
                 "--model", str(runs / "base"), "--corpus", str(runs / "corpus"), "--row", "mse_s25", "--part", "0/2"])
    assert code == 1 and capsys.readouterr().err.startswith("error: --part 0/2: sample.num_jobs is 1 in params.yaml")
    assert not (tmp_path / "x").exists()
