"""params.yaml validation: unknown keys and wrong types fail at once, naming the key."""

import copy

import pytest
import yaml

from selfperceptual.config import SCALES, ParamsError, load_params, validate_params


@pytest.fixture
def raw(repo):
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_repository_params_are_valid(raw):
    scales = validate_params(raw)
    assert set(scales) == set(SCALES)
    assert raw["scale"] == "local"


def test_paper_scale_holds_section_4_hyperparameters(raw):
    paper = validate_params(raw)["paper"]
    assert paper.train.global_batch == 896
    assert paper.train.ema_decay == 0.9995
    assert (paper.train.mse.num_steps, paper.train.sp.num_steps) == (60000, 50000)
    assert paper.train.mse.learning_rate == paper.train.sp.learning_rate == 3.0e-5
    assert (paper.train.mse.condition_dropout, paper.train.sp.condition_dropout) == (0.1, 0.0)
    assert (paper.filter.min_aesthetic, paper.filter.min_side) == (6.0, 512)
    assert paper.base.pretrained == "stabilityai/stable-diffusion-2-1-base"


def test_unknown_key_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["smoke"]["train"]["learning_rat"] = 1.0
    with pytest.raises(ParamsError, match=r"smoke\.train\.learning_rat: unknown key"):
        validate_params(bad)


def test_wrong_type_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["local"]["train"]["global_batch"] = "48"
    with pytest.raises(ParamsError, match=r"local\.train\.global_batch"):
        validate_params(bad)


def test_yaml_exponent_without_dot_is_caught(raw):
    bad = copy.deepcopy(raw)
    bad["local"]["train"]["mse"]["learning_rate"] = yaml.safe_load("3e-5")  # PyYAML reads a string
    with pytest.raises(ParamsError, match=r"local\.train\.mse\.learning_rate"):
        validate_params(bad)


def test_bad_choice_and_missing_tiny_settings_are_named(raw):
    bad = copy.deepcopy(raw)
    bad["smoke"]["train"]["sp"]["layer"] = "bottleneck"
    del bad["local"]["base"]["vae"]
    with pytest.raises(ParamsError) as error:
        validate_params(bad)
    assert "smoke.train.sp.layer" in str(error.value)
    assert "local.base" in str(error.value) and "vae" in str(error.value)


def test_unknown_scale_and_top_level_key(raw, tmp_path):
    bad = copy.deepcopy(raw)
    bad["scale"] = "huge"
    bad["extra"] = 1
    with pytest.raises(ParamsError, match="extra: unknown key") as error:
        validate_params(bad)
    assert "scale: must be one of" in str(error.value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="scale: must be one of"):
        load_params(path, "huge")


def test_schema_file_is_generated_from_the_config(repo):
    import json

    from selfperceptual.config import json_schema

    assert json.loads((repo / "workflow/schemas/params.schema.json").read_text()) == json_schema(), "run: make generate"


def test_set_overrides_one_key_and_validates_it(repo):
    from selfperceptual.config import load_params

    _, config = load_params(repo / "params.yaml", "smoke", ["train.sp.layer=encoder", "train.sp.learning_rate=2.0e-4"])
    assert (config.train.sp.layer, config.train.sp.learning_rate) == ("encoder", 2.0e-4)
    assert config.train.sp.distance == load_params(repo / "params.yaml", "smoke")[1].train.sp.distance
    with pytest.raises(ParamsError, match=r"smoke\.train\.sp\.layer"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layer=bottleneck"])
    with pytest.raises(ParamsError, match=r"--set train\.sp\.layr=encoder: no such key"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layr=encoder"])
    with pytest.raises(ParamsError, match="no such key"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layer"])
