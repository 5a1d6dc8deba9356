"""params.yaml validation: unknown keys and wrong types fail at once, naming the key."""

import copy

import pytest
import yaml

from selfperceptual.pipeline.config import MERGE_TAG, SCALES, ParamsError, load_params, validate_params


@pytest.fixture
def raw(repo):
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_repository_params_are_valid(raw):
    scales = validate_params(raw)
    assert set(scales) == set(SCALES)
    assert raw["scale"] in scales  # the user's choice (the repository ships local); any block it names


def test_paper_scale_holds_section_4_hyperparameters(raw):
    paper = validate_params(raw)["paper"]
    assert paper.train.global_batch == 896
    assert paper.train.ema_decay == 0.9995
    assert (paper.train.mse.num_steps, paper.train.sp.num_steps) == (60000, 50000)
    assert paper.train.mse.learning_rate == paper.train.sp.learning_rate == 3.0e-5
    assert (paper.train.mse.condition_dropout, paper.train.sp.condition_dropout) == (0.1, 0.0)
    assert (paper.filter.min_aesthetic, paper.filter.min_side) == (6.0, 512)
    assert paper.base.pretrained == "stabilityai/stable-diffusion-2-1-base"


# What the rehearsal may change of the paper block: sizes (of data, batches and jobs), step counts,
# job splits, input paths. GPUs and nodes per job stay the paper's.
SIZES = (
    "corpus.num_eval_captions", "filter.min_side", "download.resolution", "download.processes", "download.threads",
    "download.shard_size", "encode.batch", "encode.shard_size", "train.global_batch", "train.max_per_device_batch",
    *(f"train.{objective}.max_per_device_batch" for objective in ("mse", "sp", "lpl", "casdm")),
    "sample.num_images", "sample.batch", "evaluate.batch", "clip.batch", "figures.num_prompts", "figures.uncond_images", "figures.x0_prompts",
)
STEPS = ("train.mse.num_steps", "train.sp.num_steps", "train.lpl.num_steps", "train.casdm.num_steps", "train.log_every_steps",
         "train.preview_every_steps", "train.checkpoint_every_steps", "figures.uncond_steps")
SPLITS = ("download.num_jobs", "encode.num_jobs", "sample.num_jobs")
INPUT_PATHS = ("corpus.laion_parquet", "corpus.coco_captions", "corpus.coco_images", "base.pretrained", "featnet.inception_weights",
               "authors.mse", "authors.sp", "evaluate.clip", "train.casdm.metric_weights", "clip.model", "aesthetic.weights",
               # the published hashes of those files: the rehearsal's are random files the project makes
               "featnet.inception_sha256", "train.casdm.metric_weights_sha256", "aesthetic.weights_sha256")
COMMANDS = ("default", "corpus", "filter", "download", "clip_embed", "base", "featnet", "encode", "train", "freeze", "sample", "evaluate",
            "figures", "report")
JOB_SIZES = tuple(f"resources.{command}.{size}" for command in COMMANDS for size in ("cpus", "mem_mb", "runtime_min"))
# Speed settings that need a GPU to pay (Inductor compiles a UNet for minutes on a CPU).
GPU_SPEED = ("train.compile", "train.channels_last")
REHEARSAL_MAY_DIFFER = (*SIZES, *STEPS, *SPLITS, *INPUT_PATHS, *JOB_SIZES, *GPU_SPEED)
# The workstation: the paper's inputs; sizes, steps and splits, its GPUs per job among them (one GPU).
WORKSTATION_MAY_DIFFER = (*SIZES, *STEPS, *SPLITS, *JOB_SIZES, *(f"resources.{command}.gpus" for command in COMMANDS))
MAY_DIFFER = {"rehearsal": REHEARSAL_MAY_DIFFER, "workstation": WORKSTATION_MAY_DIFFER}


def _leaves(block: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in block.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _differences(first: dict, second: dict) -> set[str]:
    a, b = _leaves(first), _leaves(second)
    return {key for key in a.keys() | b.keys() if a.get(key, "<absent>") != b.get(key, "<absent>")}


@pytest.mark.parametrize("scale", ["rehearsal", "workstation"])
def test_rehearsal_and_workstation_differ_from_paper_only_in_sizes_steps_and_splits(raw, scale):
    differences = _differences(raw["paper"], raw[scale])
    assert differences - set(MAY_DIFFER[scale]) == set(), f"the {scale} scale must follow the paper scale"
    assert "train.mse.num_steps" in differences
    if scale == "rehearsal":  # its own tiny inputs in the paper's formats
        assert {"base.pretrained", "featnet.inception_weights"} <= differences
    # Each key, once resolved by the schema, too: a default the paper block leaves out counts.
    resolved = validate_params(raw)
    assert _differences(resolved["paper"].model_dump(), resolved[scale].model_dump()) - set(MAY_DIFFER[scale]) == set()


def test_the_comparison_catches_a_changed_method_setting(raw):
    changed = copy.deepcopy(raw)
    changed["rehearsal"]["train"]["ema_decay"] = 0.999
    changed["rehearsal"]["train"]["sp"]["layer"] = "encoder"
    assert _differences(changed["paper"], changed["rehearsal"]) - set(REHEARSAL_MAY_DIFFER) == {"train.ema_decay", "train.sp.layer"}


def test_unknown_key_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["smoke"]["train"]["learning_rat"] = 1.0
    with pytest.raises(ParamsError, match=r"^invalid params\.yaml: smoke\.train\.learning_rat: unknown key"):
        validate_params(bad)


def test_wrong_type_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["local"]["train"]["global_batch"] = "48"
    with pytest.raises(ParamsError, match=r"^invalid params\.yaml: local\.train\.global_batch: "):
        validate_params(bad)


def test_yaml_exponent_without_dot_is_caught(raw):
    bad = copy.deepcopy(raw)
    bad["local"]["train"]["mse"]["learning_rate"] = yaml.safe_load("3e-5")  # PyYAML reads a string
    with pytest.raises(ParamsError, match=r"^invalid params\.yaml: local\.train\.mse\.learning_rate: "):
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

    from selfperceptual.pipeline.config import json_schema

    assert json.loads((repo / "workflow/schemas/params.schema.json").read_text()) == json_schema(), "run: make generate"


def test_set_overrides_one_key_and_validates_it(repo):
    from selfperceptual.pipeline.config import load_params

    _, config = load_params(repo / "params.yaml", "smoke", ["train.sp.layer=encoder", "train.sp.learning_rate=2.0e-4"])
    assert (config.train.sp.layer, config.train.sp.learning_rate) == ("encoder", 2.0e-4)
    assert config.train.sp.distance == load_params(repo / "params.yaml", "smoke")[1].train.sp.distance
    with pytest.raises(ParamsError, match=r"smoke\.train\.sp\.layer"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layer=bottleneck"])
    with pytest.raises(ParamsError, match=r"--set train\.sp\.layr=encoder: no such key"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layr=encoder"])
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layer"])


def _written(node, prefix: str = "") -> set[str]:
    """The leaf keys a YAML mapping node writes itself, in any section: not those it merges (<<)."""
    found = set()
    for key_node, value_node in node.value:
        if key_node.tag == MERGE_TAG:
            continue
        key = f"{prefix}{key_node.value}"
        found |= _written(value_node, f"{key}.") if isinstance(value_node, yaml.MappingNode) else {key}
    return found


@pytest.mark.parametrize(("scale", "base"), [("rehearsal", "paper"), ("workstation", "paper"), ("smoke", "local")])
def test_a_derived_scale_is_its_base_plus_what_it_writes(repo, raw, scale, base):
    """The file's structure states the rule: rehearsal and workstation merge the paper block (smoke
    the local one) and write only keys they may change; what they do not write is their base's."""
    root = yaml.compose((repo / "params.yaml").read_text(), Loader=yaml.SafeLoader)
    blocks = {key.value: value for key, value in root.value}
    merged = [value for key, value in blocks[scale].value if key.tag == MERGE_TAG]
    assert len(merged) == 1 and merged[0] is blocks[base]  # an alias composes to its anchor's own node
    written, own, inherited = _written(blocks[scale]), _leaves(raw[scale]), _leaves(raw[base])
    assert all(own[key] == inherited[key] for key in own.keys() - written)
    changed = {key for key in written if own.get(key) != inherited.get(key, "<absent>")}
    assert changed, f"{scale} changes nothing of {base}"
    if scale in MAY_DIFFER:
        assert changed - set(MAY_DIFFER[scale]) == set(), f"the {scale} scale writes keys it must take from paper"


def test_show_prints_a_scale_resolved(repo, capsys):
    from selfperceptual.pipeline.config import main

    assert main(["show", "rehearsal", "--params", str(repo / "params.yaml"), "--set", "train.sp.layer=encoder"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["rehearsal"]
    resolved = load_params(repo / "params.yaml", "rehearsal", ["train.sp.layer=encoder"])[1].model_dump()
    assert shown == resolved and shown["train"]["sp"]["layer"] == "encoder" and shown["train"]["compile"] is False
    assert shown["train"]["casdm"]["metric"] == "vgg"  # what the rehearsal takes from the paper block


def test_a_stage_reads_only_the_params_it_declares(repo, tmp_path, monkeypatch):
    """cli.main hands a stage a view of the scale block holding its PARAMS: a stage that reads a key
    it does not declare (which would then be missing from its DVC params) fails, naming the key,
    and writes nothing."""
    from selfperceptual.pipeline import cli
    from selfperceptual.pipeline.config import ConfigView, UndeclaredParam
    from selfperceptual.pipeline.stages import corpus

    config = load_params(repo / "params.yaml", "smoke")[1]
    view = ConfigView(config, ("corpus", "download.resolution"), "corpus")
    assert view.corpus == config.corpus and view.download.resolution == config.download.resolution
    assert view.resources.of("corpus") == config.resources.of("corpus")  # how a job runs, never what it computes
    for read in (lambda: view.filter, lambda: view.download.num_jobs):
        with pytest.raises(UndeclaredParam, match=r"stage corpus reads (filter|download\.num_jobs), which its PARAMS do not name"):
            read()

    out = tmp_path / "corpus"
    argv = ["corpus", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--out", str(out)]
    monkeypatch.setattr(corpus, "PARAMS", ("corpus",))  # download.resolution left out
    with pytest.raises(UndeclaredParam, match=r"stage corpus reads download, "):
        cli.main(argv)
    assert not out.exists()
    monkeypatch.setattr(corpus, "PARAMS", ("corpus", "download.resolution"))
    assert cli.main(argv) == 0 and (out / "summary.json").is_file()
