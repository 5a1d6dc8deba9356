"""One DAG: Snakemake's rules and DVC's stages agree in names, commands, deps, params and outputs."""

import ast
import json
import re
import shutil
import subprocess
import sys
from operator import attrgetter
from pathlib import Path

import pytest
import yaml
from workspace import copy_repository, run

from selfperceptual.pipeline import cli
from selfperceptual.pipeline.config import SCALES, load_params
from selfperceptual.pipeline.dag import build_stages, external_inputs, missing_external_inputs, render_dvc_yaml


def test_dvc_yaml_is_generated_from_the_dag(repo):
    assert (repo / "dvc.yaml").read_text() == render_dvc_yaml(), "run: python -m selfperceptual.pipeline.dag --write dvc.yaml"


@pytest.mark.parametrize("scale", SCALES)
def test_outputs_of_different_scales_never_overlap(repo, scale):
    for stage in build_stages(load_params(repo / "params.yaml", scale)[1]):
        assert stage.out.startswith("runs/{scale}/")
        assert all(dep.startswith(("runs/{scale}/", "workflow/")) for dep in stage.deps)


def _snakemake_rules(repo):
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(config={"scale": "local"}),
            snakefile=repo / "Snakefile",
            workdir=repo,
        )
        rules = {}
        for rule in workflow_api._workflow.rules:  # the parsed rules, as Snakemake will run them
            if rule.name == "all":
                continue
            rules[rule.name] = {
                "cmd": rule.params.cmd,
                "deps": sorted(str(path) for path in rule.input),
                "outs": sorted(str(path) for path in rule.output),
                "params": json.loads(rule.params.values),
            }
        return rules


def _dvc_stages(repo):
    from dvc.repo import Repo

    scale = yaml.safe_load((repo / "params.yaml").read_text())["scale"]
    stages = {}
    with Repo(str(repo)) as dvc:
        for stage in dvc.index.stages:
            values = {}
            for dep in stage.params:
                for key, value in dep.read_params().items():  # DVC's own reading of params.yaml
                    values[key.removeprefix(f"{scale}.")] = value
            stages[stage.name] = {
                "cmd": stage.cmd,
                "deps": sorted(str(dep.def_path) for dep in stage.deps if dep not in stage.params),
                "outs": sorted(str(out.def_path) for out in stage.outs),
                "params": values,
            }
    return stages


def test_training_seeds_repeat_the_table_1_and_8_runs_and_rows_only(repo):
    from selfperceptual.pipeline.experiments import SAMPLE_ROWS, TRAIN_RUNS

    one = {stage.name: stage for stage in build_stages(load_params(repo / "params.yaml", "local", ["train.seeds=1"])[1])}
    three = {stage.name: stage for stage in build_stages(load_params(repo / "params.yaml", "local", ["train.seeds=3", "train.seed=5"])[1])}
    added = set(three) - set(one)
    main = ("train_mse", "train_sp", "train_mse_uncond", "train_sp_uncond", "freeze", "freeze_uncond")
    assert {name for name in added if not name.startswith(("sample_", "evaluate_"))} == {f"{name}_seed{k}" for name in main for k in (1, 2)}
    table_rows = ("mse_s25", "mse_s50", "mse_cfg75_s25", "mse_cfg75_r07_s25", "sp_s25", "sp_s50", "uncond_mse_s25", "uncond_sp_s25")
    assert {name for name in added if name.startswith("evaluate_")} == {f"evaluate_{row}_seed{k}" for row in table_rows for k in (1, 2)}
    sp = three["train_sp_seed2"]
    assert "--init runs/{scale}/train_mse_seed2" in sp.args and "--perceptual runs/{scale}/freeze_seed2" in sp.args
    assert "--set train.seed=7" in sp.args and "train.seed=" not in three["train_sp"].args
    assert "--model runs/{scale}/train_sp_uncond_seed1" in three["sample_uncond_sp_s25_seed1"].args
    assert not any("_seed" in name for name in one) and {name for name in one if name.startswith("train_")} == set(TRAIN_RUNS)
    assert {name for name in one if name.startswith("sample_")} == {f"sample_{row}" for row in SAMPLE_ROWS}


def test_snakemake_and_dvc_dags_are_identical(repo):
    snakemake_rules, dvc_stages = _snakemake_rules(repo), _dvc_stages(repo)
    assert set(snakemake_rules) == set(dvc_stages)
    for name in dvc_stages:
        assert snakemake_rules[name] == dvc_stages[name], name


def test_dag_comparison_notices_a_hand_edit(tmp_path):
    copy = copy_repository(tmp_path)
    dvc_yaml = yaml.safe_load((copy / "dvc.yaml").read_text())
    dvc_yaml["stages"]["filter"]["cmd"] += " --extra"
    (copy / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    with pytest.raises(AssertionError):
        test_snakemake_and_dvc_dags_are_identical(copy)


def test_paper_scale_names_each_missing_external_input_and_where_to_get_it(repo):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--config", "scale=paper"], cwd=repo, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for key in ("corpus.laion_parquet", "corpus.coco_captions", "corpus.coco_images", "base.pretrained", "authors.mse", "authors.sp", "evaluate.clip",
                "train.casdm.metric_weights", "clip.model", "aesthetic.weights"):  # fmt: skip
        assert f"{key}: " in output
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in output
    assert re.search(r"featnet.inception_weights: \S+ is not there\. Get it from https://github.com/toshas/torch-fidelity/releases/\S+\.pth", output)
    assert "http://images.cocodataset.org/zips/val2014.zip" in output


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` as the Hugging Face cache holds a downloaded model (refs/main -> a snapshot)."""
    model = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, model / "snapshots" / ("0" * 40))
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text("0" * 40)


def test_paper_scale_lists_the_full_plan_when_inputs_exist(tmp_path, rehearsal_inputs):
    """The rehearsal's inputs, in the real formats, where the paper block looks for its own: local
    paths for the data and Inception's weights, the Hugging Face cache for the hub models."""
    copy = copy_repository(tmp_path)
    (copy / "data").mkdir(exist_ok=True)
    (copy / "data" / "rehearsal").symlink_to(rehearsal_inputs)  # what `python -m selfperceptual.pipeline.rehearsal data/rehearsal` writes
    paper, rehearsal = (load_params(copy / "params.yaml", scale)[1] for scale in ("paper", "rehearsal"))
    for key in ("laion_parquet", "coco_captions", "coco_images"):
        (copy / getattr(paper.corpus, key)).parent.mkdir(parents=True, exist_ok=True)
        (copy / getattr(paper.corpus, key)).symlink_to((copy / getattr(rehearsal.corpus, key)).resolve())
    for key in ("featnet.inception_weights", "train.casdm.metric_weights", "aesthetic.weights"):
        (copy / attrgetter(key)(paper)).parent.mkdir(parents=True)
        (copy / attrgetter(key)(paper)).symlink_to((copy / attrgetter(key)(rehearsal)).resolve())
    cache = tmp_path / "hub"
    models = ("base.pretrained", "authors.mse", "authors.sp", "evaluate.clip", "clip.model")
    for repo_id, folder in dict(tuple(attrgetter(key)(config) for config in (paper, rehearsal)) for key in models).items():
        _hub_cache(cache, repo_id, copy / folder)
    result = run([sys.executable, "-m", "snakemake", "-n", "--config", "scale=paper"], copy, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    stages = build_stages(paper)
    for stage in stages:
        assert f"rule {stage.name}:" in result.stdout
    assert re.search(rf"^total\s+{len(stages) + 1}$", result.stdout, re.MULTILINE)  # every stage, and `all`
    assert {"authors_mse", "authors_sp", "evaluate_authors_sp_s50"} <= {stage.name for stage in stages}
    # The authors' checkpoints through Table 1's rows: nothing is downloaded, encoded or trained.
    authors = run([sys.executable, "-m", "snakemake", "-n", "authors", "--config", "scale=paper"], copy, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    planned = set(re.findall(r"^rule (\w+):", authors.stdout, re.MULTILINE))
    assert {"authors_mse", "authors_sp", "evaluate_authors_mse_cfg75_r07_s25", "featnet"} <= planned
    assert not {name for name in planned if name.startswith(("train", "encode", "download", "freeze"))}


def test_a_bad_params_key_stops_snakemake_before_any_job(tmp_path):
    copy = copy_repository(tmp_path)
    params = (copy / "params.yaml").read_text().replace("global_batch: 16", "global_bach: 16", 1)
    (copy / "params.yaml").write_text(params)
    result = run([sys.executable, "-m", "snakemake", "--cores", "1", "--config", "scale=smoke"], copy, check=False)
    assert result.returncode != 0
    assert "smoke.train.global_bach: unknown key" in result.stdout + result.stderr
    assert not (copy / "runs").exists()


def test_a_dvc_yaml_behind_params_yaml_is_named_and_not_committed_to(tmp_path):
    copy = copy_repository(tmp_path)
    params = copy / "params.yaml"
    local = params.read_text().index("\nlocal:")
    text = params.read_text()
    params.write_text(text[:local] + re.sub(r"\n    seeds: \d+", "\n    seeds: 4", text[local:], count=1))
    result = run([sys.executable, "-m", "snakemake", "-n"], copy)
    assert "dvc.yaml does not match params.yaml" in result.stdout + result.stderr and "rule train_sp_seed3:" in result.stdout
    run([sys.executable, "-m", "selfperceptual.pipeline.dag", "--write", "dvc.yaml"], copy)
    result = run([sys.executable, "-m", "snakemake", "-n"], copy)
    assert "dvc.yaml does not match" not in result.stdout + result.stderr


def test_the_docs_list_every_external_input_the_paper_scale_checks(repo):
    """docs/scales.md's table of the paper's external inputs names each key the pipeline checks (it once
    listed six of eleven)."""
    section = (repo / "docs" / "scales.md").read_text().split("## The paper scale", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", section))
    checked = set(external_inputs())
    named = {line.split(":", 1)[0] for line in missing_external_inputs(load_params(repo / "params.yaml", "paper")[1])}
    assert named <= checked and len(checked) == 11
    assert checked <= listed, sorted(checked - listed)


def test_each_stage_carries_the_spec_its_command_is_rendered_from(repo):
    """Training, sampling and evaluation stages hold their run or row as data; the command is made
    from it (settings as ``--set key=value``), and the settings apply to the scale block as data."""
    from selfperceptual.pipeline.config import apply_settings
    from selfperceptual.pipeline.dag import set_flags
    from selfperceptual.pipeline.experiments import SampleRow, TrainRun

    config = load_params(repo / "params.yaml", "local")[1]
    stages = build_stages(config)
    for stage in stages:
        if stage.command == "train":
            assert isinstance(stage.spec, TrainRun) and stage.spec.name == stage.name
            assert all(flag in stage.args for flag in set_flags(stage.spec.overrides(config)))
            trained = apply_settings(config, stage.spec.overrides(config)).train
            assert all(apply_settings(config, {key: value}) == apply_settings(config, dict(stage.spec.settings)) for key, value in stage.spec.settings)
            assert trained.seed == config.train.seed + stage.spec.seed
            # What it depends on comes from the spec and what each setting affects (config.AFFECTS):
            # the trained weights and the loss curve, not speed, memory or what is kept.
            assert stage.params == stage.spec.params() and f"train.{stage.spec.objective}" in stage.params
            assert "train.seed" in stage.params and "train.log_every_steps" in stage.params
            assert not {"train.compile", "train.max_per_device_batch", "train.keep_checkpoints", "train.seeds"} & set(stage.params)
        elif stage.command in ("sample", "evaluate"):
            assert isinstance(stage.spec, SampleRow)
            assert stage.command == "evaluate" or f"--row {stage.spec.name}" in stage.args
    seeded = next(stage for stage in stages if stage.name == "train_sp_seed2")
    assert "--set train.seed=2" in seeded.args and seeded.spec.overrides(config) == {"train.seed": 2}


STAGE_MODULES = Path(__file__).resolve().parents[1] / "src" / "selfperceptual" / "pipeline" / "stages"
METHODS = {"model_dump", "of"}  # config.sample.model_dump(), config.resources.of(...): the section itself is read


def _config_reads(module: Path) -> set[str]:
    """Every ``config.a.b`` a stage module reads, as the dotted key under the scale block."""
    tree = ast.parse(module.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "config":
            chain, current = [], node
            while isinstance(parents.get(current), ast.Attribute):
                current = parents[current]
                chain.append(current.attr)
            while chain and chain[-1] in METHODS:
                chain.pop()
            if chain:
                reads.add(".".join(chain))
    return reads


def test_a_stage_s_params_are_what_its_module_reads(repo):
    """A stage's DVC params are its spec's (a training run, a released model) or its command
    module's PARAMS; every config key the module's source reads is under one of them (the command
    line holds it to them at run time too, test_config.py), so no stage goes stale in DVC."""
    from selfperceptual.pipeline.config import ALWAYS_READABLE
    from selfperceptual.pipeline.stages import declared_params

    stages = build_stages(load_params(repo / "params.yaml", "local")[1])
    commands = {stage.command for stage in stages}
    assert commands == set(cli.STAGES)
    for stage in stages:
        expected = stage.spec.params() if hasattr(stage.spec, "params") else declared_params(stage.command)
        assert stage.params == expected, stage.name
    for command in commands - {"train"}:  # train's come from its TrainRun (test above)
        declared = (*declared_params(command), *ALWAYS_READABLE)
        reads = _config_reads(STAGE_MODULES / f"{command}.py")
        assert reads or command == "freeze", command  # the scan sees reads (freeze copies a UNet, reading no settings)
        undeclared = {key for key in reads if not any(key == d or key.startswith(f"{d}.") for d in declared)}
        assert not undeclared, f"{command} reads {sorted(undeclared)} beyond its PARAMS"
        unread = {d for d in declared_params(command) if not any(key == d or key.startswith(f"{d}.") or d.startswith(f"{key}.") for key in reads)}
        assert not unread, f"{command} declares {sorted(unread)}, which it does not read"
    assert "evaluate.is_splits" in declared_params("featnet")  # once missing from the hand list (Inception Score's splits)


def test_an_ablation_setting_has_one_spelling_from_params_to_the_report(repo):
    """A run's setting is the value params.yaml takes; its table row, the paper's numbers beside it
    and its tracker tag spell it the same."""
    import yaml

    from selfperceptual.pipeline.config import apply_settings
    from selfperceptual.pipeline.experiments import ABLATION_RUNS, TABLES

    config = load_params(repo / "params.yaml", "smoke")[1]
    paper = yaml.safe_load((repo / "workflow/paper_results.yaml").read_text())
    labelled = {entry.row: entry.paper for table in TABLES.values() for entry in table.rows if entry.row}
    for ablation in (ablation for ablation in ABLATION_RUNS if ablation.settings):
        ((key, value),) = ablation.settings
        setting = key.rsplit(".", 1)[1]
        assert apply_settings(config, {key: value}).train.sp.model_dump()[setting] == value  # a value params.yaml accepts
        assert labelled[f"{ablation.name.removeprefix('train_')}_s25"] == {setting: value}
        assert ablation.ablation == f"sp.{setting}={value}"
        table = next(name for name, table in TABLES.items() if any(entry.paper.get(setting) == value for entry in table.rows))
        assert any(entry.get(setting) == value for entry in paper[table]), f"{table} of paper_results.yaml spells {value!r} otherwise"


def test_snakemake_lint_leaves_only_the_per_rule_environment(repo):
    """Every rule has its log and the Snakefile no functions among its rules; what `--lint` still
    says is the conda environment or container per rule, left on purpose (docs/pipeline.md)."""
    linted = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--config", "scale=smoke"], cwd=repo, capture_output=True, text=True)
    said = {line.strip().rstrip(":.") for line in (linted.stdout + linted.stderr).splitlines() if line.strip().startswith("* ")}
    assert said == {"* Specify a conda environment or container for each rule"}, said
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forcerun", "corpus", "runs/smoke/corpus", "--config", "scale=smoke"], cwd=repo, capture_output=True, text=True, check=True)
    assert "--log runs/smoke/logs/corpus.log" in dry.stdout
