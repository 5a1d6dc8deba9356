"""Objectives are plug-ins: one made in this file, registered here, trains, saves, loads, samples and
is costed through the package's own entry points, with no edit to the package; an objective no one
registered is an error wherever it is named."""

import json

import pytest
import torch
from pydantic import Field

from selfperceptual.method import objectives
from selfperceptual.method.errors import MissingComponent, UnknownObjective
from selfperceptual.method.objectives import Objective, ObjectiveSettings
from selfperceptual.method.objectives.base import _REGISTRY


class TimeWeightedSettings(ObjectiveSettings):
    late_weight: float = Field(ge=0)  # how much more the loss counts at t = T than at t = 0


class TimeWeightedLoss:
    """Eq. 4 weighted by (1 + late_weight * t / T): a toy objective with a setting of its own."""

    def __init__(self, schedule, late_weight: float):
        from selfperceptual.method.losses import MSELoss

        self.mse, self.late_weight, self.schedule = MSELoss(schedule), late_weight, schedule
        self.calls = 0

    def draw(self, x0, generators):
        return self.mse.draw(x0, generators)

    def to(self, device, memory_format=torch.preserve_format):
        return self

    def compile(self):
        return self

    def __call__(self, denoiser, x0, context, **randomness):
        self.calls += 1
        per_sample, logs = self.mse(denoiser, x0, context, **randomness)
        weight = 1 + self.late_weight * logs["t"].float() / self.schedule.num_train_timesteps
        return per_sample * weight, logs


class TimeWeighted(Objective):
    name, label = "time_weighted", "Time-weighted MSE"
    summary = "the MSE loss, counted more at high noise."
    settings = TimeWeightedSettings
    built: list = []

    def loss(self, settings, schedule, pipeline, inputs):
        loss = TimeWeightedLoss(schedule, settings.late_weight)
        self.built.append(loss)
        return loss

    def flops_per_image(self, counts, settings, num_train_timesteps):
        return 1.5 * counts()["unet_train"]

    def tags(self, settings, inputs):
        return {"late_weight": str(settings.late_weight)}


@pytest.fixture
def time_weighted(monkeypatch):
    """The toy objective, registered for one test (the registry as it was after)."""
    monkeypatch.setitem(_REGISTRY, TimeWeighted.name, TimeWeighted())
    TimeWeighted.built.clear()
    return objectives.get(TimeWeighted.name)


@pytest.fixture
def params_with_toy(repo, tmp_path):
    """params.yaml with the toy's settings in the smoke scale's train block (the other scales have none)."""
    import yaml

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["smoke"]["train"]["time_weighted"] = {"num_steps": 4, "condition_dropout": 0.1, "learning_rate": 1.0e-3, "late_weight": 3.0}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_registered_objective_trains_saves_loads_samples_and_is_costed(time_weighted, params_with_toy, smoke_stages, tmp_path):
    from selfperceptual.method.models import load_stage_pipeline
    from selfperceptual.method.sampling import generate
    from selfperceptual.pipeline.cli import main
    from selfperceptual.pipeline.config import load_params
    from selfperceptual.pipeline.cost import train_flops_per_image

    out = tmp_path / "train_time_weighted"
    code = main(["train", "--params", str(params_with_toy), "--scale", "smoke", "--out", str(out), "--data", str(smoke_stages / "encode"),
                 "--init", str(smoke_stages / "base"), "--objective", "time_weighted", "--conditioning", "text",
                 "--checkpoints", str(tmp_path / "checkpoints")])  # fmt: skip
    assert code == 0
    # Trained with its own loss and its own settings: four steps of it, then saved as the stage saves every model.
    (loss,) = time_weighted.built
    assert loss.late_weight == 3.0 and loss.calls >= 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_steps"] == 4 and metrics["final_loss"] > 0
    params = json.loads((out / "params.json").read_text())
    assert params["train"]["time_weighted"]["late_weight"] == 3.0
    trained = load_stage_pipeline("model", out)
    base = load_stage_pipeline("model", smoke_stages / "base")
    assert not torch.equal(trained.unet.conv_in.weight, base.unet.conv_in.weight)
    # Samples like any pipeline, deterministically per seed.
    trained.set_progress_bar_config(disable=True)
    first, again = (generate(trained, ["a red circle"], [0], 3, None, None)[0] for _ in range(2))
    assert first.size == (32, 32) and first.tobytes() == again.tobytes()
    # Costed by its own count: the cost model asks the objective, not a table of names.
    settings = load_params(params_with_toy, "smoke")[1].train.objective("time_weighted")
    mse = train_flops_per_image(64, "mse", settings)
    assert train_flops_per_image(64, "time_weighted", settings) == pytest.approx(1.5 * mse)


def test_a_registered_objective_is_an_argument_and_a_params_section(time_weighted, params_with_toy, repo):
    from selfperceptual.pipeline.config import ParamsError, load_params

    assert "time_weighted" in objectives.names()
    settings = load_params(params_with_toy, "smoke")[1].train.time_weighted
    assert isinstance(settings, TimeWeightedSettings) and settings.late_weight == 3.0
    bad = params_with_toy.read_text().replace("late_weight: 3.0", "late_weight: -1.0")
    params_with_toy.write_text(bad)
    with pytest.raises(ParamsError, match=r"smoke\.train\.time_weighted\.late_weight: Input should be greater than or equal to 0"):
        load_params(params_with_toy, "smoke")
    with pytest.raises(ParamsError, match="train.time_weighted: the scale block has no settings for objective 'time_weighted'"):
        load_params(repo / "params.yaml", "local")[1].train.objective("time_weighted")


def test_an_unregistered_objective_is_an_error_wherever_it_is_named(params_with_toy, repo, tmp_path, capsys):
    from selfperceptual.method.models import pipeline_class
    from selfperceptual.pipeline.cli import main
    from selfperceptual.pipeline.config import ParamsError, load_params
    from selfperceptual.pipeline.cost import train_flops_per_image

    with pytest.raises(UnknownObjective, match="unknown objective 'time_weighted'; the registered ones are mse, sp, lpl, casdm"):
        objectives.get("time_weighted")
    with pytest.raises(ParamsError, match=r"smoke\.train\.time_weighted: unknown key"):  # its settings, with no objective to read them
        load_params(params_with_toy, "smoke")
    with pytest.raises(SystemExit):
        main(["train", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--out", str(tmp_path / "out"), "--data", "x", "--init", "y",
              "--objective", "time_weighted", "--conditioning", "text", "--checkpoints", "z"])  # fmt: skip
    assert "invalid choice: 'time_weighted'" in capsys.readouterr().err
    with pytest.raises(UnknownObjective):
        train_flops_per_image(64, "time_weighted", None)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "TimeWeightedPipeline"}))
    with pytest.raises(MissingComponent, match="holds a TimeWeightedPipeline, which no registered objective saves"):
        pipeline_class(tmp_path / "pipeline")


def test_the_method_imports_nothing_of_the_pipeline():
    """selfperceptual.method stands alone: no module of it imports selfperceptual.pipeline, at
    import or inside a function, and importing all of it loads none of the pipeline."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import selfperceptual.method as method

    root = Path(method.__file__).parent
    for path in root.rglob("*.py"):
        package = ["selfperceptual", *path.relative_to(root.parent).parent.parts]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            elif isinstance(node, ast.Import):
                target = " ".join(alias.name for alias in node.names)
            else:
                continue
            assert "selfperceptual.pipeline" not in target, f"{path.relative_to(root)} imports {target}"
    modules = [f"selfperceptual.method.{'.'.join(p.relative_to(root).with_suffix('').parts)}" for p in root.rglob("*.py") if p.name != "__init__.py"]
    code = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print(sorted(m for m in sys.modules if m.startswith('selfperceptual.pipeline')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
