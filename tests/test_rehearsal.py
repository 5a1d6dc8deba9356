"""The rehearsal inputs are the paper scale's external formats, readable by the code that reads those."""

import json

import pandas as pd
import torch

from selfperceptual.pipeline.data.corpus import LAION_COLUMNS
from selfperceptual.pipeline.rehearsal import INCEPTION_FILE


def test_laion_metadata_has_the_laion_aesthetics_columns_and_http_urls(rehearsal_inputs):
    rows = pd.read_parquet(rehearsal_inputs / "laion" / "metadata.parquet")
    assert set(LAION_COLUMNS) <= set(rows.columns)
    assert rows["URL"].str.startswith("http://127.0.0.1:9/").all()
    served = {path.name for path in (rehearsal_inputs / "laion-images").iterdir()}
    assert 0 < len(served) < len(rows)  # some URLs answer 404
    assert (rows["AESTHETIC_SCORE"] > 6).any() and (rows["AESTHETIC_SCORE"] <= 6).any()
    assert (rows[["WIDTH", "HEIGHT"]].min(axis=1) > 64).any() and (rows[["WIDTH", "HEIGHT"]].min(axis=1) <= 64).any()


def test_coco_captions_follow_the_2014_annotation_format(rehearsal_inputs):
    document = json.loads((rehearsal_inputs / "coco" / "annotations" / "captions_val2014.json").read_text())
    assert {"info", "images", "licenses", "annotations"} <= set(document)
    files = {image["id"]: image["file_name"] for image in document["images"]}
    assert all((rehearsal_inputs / "coco" / "val2014" / name).is_file() for name in files.values())
    assert all(name.startswith("COCO_val2014_") for name in files.values())
    assert len(document["annotations"]) == 5 * len(files)
    first = [a["image_id"] for a in document["annotations"][:5]]
    assert len(set(first)) > 1  # captions of different images interleave, as in the real file


def test_sd21_layout_loads_as_stable_diffusion_with_a_clip_bpe_tokenizer(rehearsal_inputs):
    from diffusers import StableDiffusionPipeline

    folder = rehearsal_inputs / "sd21-base"
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert type(pipeline.tokenizer).__name__ == "CLIPTokenizer" and pipeline.tokenizer.model_max_length == 77
    tokens = pipeline.tokenizer.convert_ids_to_tokens(pipeline.tokenizer("a small red circle").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and "circle</w>" in tokens  # merges learnt
    assert pipeline.scheduler.config.prediction_type == "epsilon"  # SD 2.1-base's own: the base stage replaces it
    assert list(pipeline.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert pipeline.unet.config.use_linear_projection and len(pipeline.vae.config.block_out_channels) == 4
    with torch.no_grad():
        assert pipeline.text_encoder(pipeline.tokenizer(["a cat"], return_tensors="pt").input_ids)[0].shape[-1] == pipeline.unet.config.cross_attention_dim


def test_inception_weights_are_torch_fidelity_state_dict(rehearsal_inputs):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(rehearsal_inputs / "inception" / INCEPTION_FILE))
    assert sum(p.numel() for p in network.parameters()) > 20_000_000  # the full-size network
